"""The training loop: build everything from a validated config, then train, evaluate and checkpoint.

One optimizer step, on every rank::

    for each of the split's supervision steps: read the next global batch (this rank's slice)
    for each micro-batch (grad_accum_steps slices of it, each with its own ACT carry):
        run the supervision steps (one ACT step each)            -> LossTerms per step
        jd_step.backward(terms)                                   -> .grad of weights and puzzle rows
    jd_step.finish()                                              -> gradients reduced over ranks once
    skip the step if any gradient is non-finite; else AdamATan2 + sign-SGD (+ EMA)
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import Tensor

from dataset.puzzle_dataset import PuzzleDataset
from evaluators.base import Evaluator
from jd.splits import validate_split
from jd.step import build_jd_step
from models.ema import EMA
from models.losses import ACTLossHead
from models.optimizers import cosine_schedule_with_warmup, make_adam_atan2
from models.recursive_reasoning.act import ACTCarry
from models.registry import build_model
from models.sparse_embedding import SignSGDSparseEmbedding
from training.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint
from training.config import ConfigError, TrainConfig
from training.distributed import DistInfo, broadcast_module_
from training.evaluation import build_evaluators, evaluate
from training.logger import RunLogger, check_wandb_config
from training.run_dir import prepare_run_dir
from training.state import Progress, capture_rng, carry_from_dict, carry_to_dict, restore_rng

SUM_METRICS = ("count", "accuracy", "exact_accuracy", "q_halt_accuracy", "steps", "lm_loss", "q_halt_loss", "q_continue_loss")


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had non-finite losses or gradients."""


class Trainer:
    """Owns the model, optimizers, data stream and run directory of one training run."""

    def __init__(self, config: TrainConfig, dist_info: DistInfo) -> None:
        self.config = config
        self.dist = dist_info
        config.check_world(dist_info.world_size)
        check_wandb_config(config.wandb) if dist_info.is_main else None
        torch.manual_seed(config.seed + dist_info.rank)

        # Data (validated against its metadata before anything heavy is built).
        local_batch = config.global_batch_size // dist_info.world_size
        self.micro_batch = local_batch // config.grad_accum_steps
        data_kwargs = dict(rank=dist_info.rank, world_size=dist_info.world_size, seed=config.seed)
        epochs_per_iter = config.eval_interval or config.epochs
        self.train_data = PuzzleDataset(config.data_paths, "train", config.global_batch_size, epochs_per_iter=epochs_per_iter, **data_kwargs)
        self.eval_data = PuzzleDataset(config.eval_paths, "test", config.global_batch_size // config.grad_accum_steps, **data_kwargs)
        meta = self.train_data.metadata
        if self.eval_data.metadata.seq_len != meta.seq_len or self.eval_data.metadata.vocab_size != meta.vocab_size:
            raise ConfigError(f"data_paths_test {config.eval_paths} do not match data_paths {config.data_paths} in seq_len / vocab_size")
        self.total_iterations = math.ceil(config.epochs / epochs_per_iter)

        # JD: the split decides how many supervision steps one optimizer step runs.
        try:
            validate_split(
                config.jd,
                halt_max_steps=config.arch.halt_max_steps,
                H_cycles=config.arch.H_cycles,
                no_ACT_continue=config.arch.no_ACT_continue,
                batch_size=self.micro_batch,
                seq_len=meta.seq_len,
            )
            self.jd_step = build_jd_step(config.jd, world_size=dist_info.world_size)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self.supervision_steps = self.jd_step.split.supervision_steps(config.arch.halt_max_steps)
        # Each optimizer step reads one global batch per supervision step (micro-batches split it).
        estimated = max(1, self.train_data.estimated_total_batches(config.epochs) // self.supervision_steps)
        self.total_steps = min(estimated, config.max_steps) if config.max_steps else estimated

        # Model, loss head, optimizers.
        self.model = build_model(
            config.arch, seq_len=meta.seq_len, vocab_size=meta.vocab_size, num_puzzle_identifiers=meta.num_puzzle_identifiers, device=dist_info.device
        )
        broadcast_module_(self.model, dist_info.world_size)
        self.loss_head = ACTLossHead(self.model, config.arch.loss_type, differential_loss=config.jd.differential_loss)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_adam_atan2(self.params, lr=config.lr, betas=(config.beta1, config.beta2), weight_decay=config.weight_decay)
        embeddings = [self.model.puzzle_embedding] if self.model.puzzle_embedding is not None else []
        self.sparse_optimizer = (
            SignSGDSparseEmbedding(embeddings, lr=config.puzzle_emb_lr, weight_decay=config.puzzle_emb_weight_decay, world_size=dist_info.world_size)
            if embeddings
            else None
        )
        self.ema = EMA(self.model, config.ema_rate) if config.ema else None
        if config.compile_enabled(dist_info.device.type):
            if config.jd.split != "none":
                torch._functorch.config.donated_buffer = False  # JD back-propagates the same graph more than once
            self.model.core.compile()
        self.evaluators: list[Evaluator] = build_evaluators(config.evaluators, config.eval_paths)

        self.progress = Progress()
        self.carries: list[ACTCarry | None] = [None] * config.grad_accum_steps
        self._stop_signal: str | None = None

        # Run directory, resume, logging.
        checkpoint_file = self._checkpoint_to_resume()
        resume_step = None if checkpoint_file is None else self._restore(checkpoint_file)
        self.run_dir, self.run_name, self.project_name = prepare_run_dir(config, dist_info, resuming_from=checkpoint_file)
        self.logger = (
            RunLogger(self.run_dir, config.model_dump(mode="json"), config.wandb, self.run_name, self.project_name, resume_step=resume_step)
            if dist_info.is_main
            else None
        )

    # ------------------------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        """Train until ``epochs`` or ``max_steps``; evaluate and checkpoint on the way. Returns the summary."""
        config = self.config
        previous_handlers = self._install_signal_handlers()
        progress_bar = self._progress_bar()
        batches = self._batch_stream()
        last_eval: dict[str, float] = {}
        status = "finished"
        try:
            while self.progress.step < self.total_steps:
                iteration_before = self.progress.iteration
                step_batches = [next(batches, None) for _ in range(self.supervision_steps)]
                if any(batch is None for batch in step_batches):
                    break
                metrics = self._train_step(step_batches)  # type: ignore[arg-type]
                self.progress.step += 1
                if self.logger is not None and (self.progress.step % config.log_interval == 0 or self.progress.step == 1):
                    self.logger.log(self.progress.step, metrics)
                if progress_bar is not None:
                    progress_bar.update(1)
                    progress_bar.set_postfix(loss=f"{metrics.get('train/lm_loss', float('nan')):.3f}", acc=f"{metrics.get('train/accuracy', float('nan')):.3f}")

                crossed = self.progress.iteration > iteration_before
                epochs_done = self.progress.iteration * (config.eval_interval or config.epochs)
                if crossed and config.eval_interval and epochs_done >= config.min_eval_interval and self.progress.step < self.total_steps:
                    last_eval = self._evaluate_and_log()
                    if config.checkpoint_every_eval:
                        self.save()
                elif config.checkpoint_interval and self.progress.step % config.checkpoint_interval == 0:
                    self.save()
                if self._stop_requested():
                    status = f"interrupted by {self._stop_signal}"
                    self.save()
                    break
            if status == "finished":
                last_eval = self._evaluate_and_log()
                self.save()
        finally:
            if progress_bar is not None:
                progress_bar.close()
            self._restore_signal_handlers(previous_handlers)
        summary = {"status": status, "final_step": self.progress.step, "run_dir": str(self.run_dir), "eval": last_eval}
        if self.dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            if self.logger is not None:
                self.logger.close()
        return summary

    def _train_step(self, batches: list[dict[str, Tensor]]) -> dict[str, float]:
        config = self.config
        started = time.perf_counter()
        lr_scale = cosine_schedule_with_warmup(
            self.progress.step, base_lr=1.0, warmup_steps=config.lr_warmup_steps, total_steps=self.total_steps, min_ratio=config.lr_min_ratio
        )
        self.model.train()
        sums = torch.zeros(len(SUM_METRICS), device=self.dist.device)
        jd_metrics: dict[str, float] = {}
        for micro in range(config.grad_accum_steps):
            rows = slice(micro * self.micro_batch, (micro + 1) * self.micro_batch)
            step_terms = []
            for batch in batches:
                micro_batch = {key: value[rows].to(self.dist.device, non_blocking=True) for key, value in batch.items()}
                if self.carries[micro] is None:
                    self.carries[micro] = self.loss_head.initial_carry(micro_batch)
                carry, terms, metrics, _, _ = self.loss_head(
                    self.carries[micro],
                    micro_batch,
                    global_batch_size=config.global_batch_size,
                    keep_cycle_logits=self.jd_step.split.needs_cycle_logits,
                    carry_noise=config.jd.carry_perturbation_rate,
                )
                self.carries[micro] = carry
                step_terms.append(terms)
                sums += torch.stack([metrics[name].float() if name in metrics else sums.new_zeros(()) for name in SUM_METRICS])
            puzzle_rows = [rows_ for _, rows_ in self.model.puzzle_embedding.pending_rows()] if self.model.puzzle_embedding is not None else []
            jd_metrics = self.jd_step.backward(step_terms, self.params, puzzle_rows)
        self.jd_step.finish(self.params)

        grad_norm = _grad_norm(self.params)
        if self.dist.world_size > 1:
            dist.all_reduce(sums)
        finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(sums).all())
        if finite:
            if config.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.params, config.grad_clip_norm)
            for group in self.optimizer.param_groups:
                group["lr"] = config.lr * lr_scale
            self.optimizer.step()
            if self.sparse_optimizer is not None:
                for group in self.sparse_optimizer.param_groups:
                    group["lr"] = config.puzzle_emb_lr * lr_scale
                self.sparse_optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model)
            self.progress.consecutive_nonfinite = 0
        else:
            self.progress.skipped_nonfinite += 1
            self.progress.consecutive_nonfinite += 1
            if self.model.puzzle_embedding is not None:
                self.model.puzzle_embedding.clear_pending()
        self.optimizer.zero_grad(set_to_none=True)
        if self.progress.consecutive_nonfinite >= config.max_nonfinite_steps:
            self.save(tag_nonfinite=True)
            raise NonFiniteError(
                f"{self.progress.consecutive_nonfinite} optimizer steps in a row had non-finite losses or gradients "
                f"(max_nonfinite_steps={config.max_nonfinite_steps}); the last good state is in {self.run_dir / 'checkpoints'}"
            )

        values = dict(zip(SUM_METRICS, sums.tolist()))
        count = max(values.pop("count"), 1.0)
        loss_divisor = config.global_batch_size * self.supervision_steps
        out = {f"train/{name}": value / (loss_divisor if name.endswith("loss") else count) for name, value in values.items()}
        out["train/halted_count"] = count
        out["train/lr"] = config.lr * lr_scale
        out["train/grad_norm"] = float(grad_norm)
        out["train/skipped_nonfinite"] = float(self.progress.skipped_nonfinite)
        out["train/step_time_s"] = time.perf_counter() - started
        out.update(jd_metrics)
        return out

    # ------------------------------------------------------------------------------- data
    def _batch_stream(self) -> Iterator[dict[str, Tensor]]:
        """Global batches (this rank's slice) across data iterations, advancing ``self.progress``."""
        while self.progress.iteration < self.total_iterations:
            for batch in self.train_data.train_batches(self.progress.iteration, start_batch=self.progress.batch_in_iteration):
                self.progress.batch_in_iteration += 1
                yield batch
            self.progress.iteration += 1
            self.progress.batch_in_iteration = 0

    # -------------------------------------------------------------------------- evaluation
    def _evaluate_and_log(self) -> dict[str, float]:
        context = self.ema.swapped_into(self.model) if self.ema is not None else nullcontext()
        save_dir = self.run_dir / "eval" / f"step_{self.progress.step:08d}"
        with context:
            results = evaluate(
                self.loss_head,
                self.eval_data,
                self.evaluators,
                self.dist,
                global_batch_size=self.config.global_batch_size,
                max_batches=self.config.eval_max_batches,
                save_dir=save_dir if self.dist.is_main else None,
            )
        self.progress.evaluations += 1
        if self.logger is not None and results:
            self.logger.log(self.progress.step, results)
            if self.config.progress_bar:
                shown = {k: round(v, 4) for k, v in results.items() if "accuracy" in k or "pass@" in k}
                print(f"[eval step {self.progress.step}] {shown}", flush=True)
        return results

    # ------------------------------------------------------------------------- checkpoints
    def _checkpoint_to_resume(self) -> Path | None:
        config = self.config
        if config.load_checkpoint:
            return resolve_checkpoint(config.load_checkpoint)
        if config.resume:
            from training.run_dir import planned_run_dir

            run_dir = planned_run_dir(config, self.train_data)
            if run_dir is not None:
                try:
                    return resolve_checkpoint(run_dir)
                except CheckpointError:
                    return None
        return None

    def save(self, tag_nonfinite: bool = False) -> Path | None:
        """Write the full training state (all ranks take part; rank 0 writes)."""
        carries = [None if carry is None else carry_to_dict(carry) for carry in self.carries]
        rank_state = {"rng": capture_rng(), "carries": carries}
        gathered: list[Any] = [rank_state]
        if self.dist.world_size > 1:
            gathered = [None] * self.dist.world_size
            dist.all_gather_object(gathered, rank_state)
        if not self.dist.is_main:
            return None
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sparse_optimizer": None if self.sparse_optimizer is None else self.sparse_optimizer.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "progress": self.progress.to_dict(),
            "ranks": gathered,
            "jd": self.jd_step.state_dict(),
            "config": self.config.model_dump(mode="json"),
            "data": {"seq_len": self.train_data.metadata.seq_len, "vocab_size": self.train_data.metadata.vocab_size, "num_puzzle_identifiers": self.train_data.metadata.num_puzzle_identifiers},
            "nonfinite_stop": tag_nonfinite,
        }
        return save_checkpoint(state, self.run_dir, self.progress.step, self.config.keep_last)

    def _restore(self, path: Path) -> int:
        state = load_checkpoint(path, map_location=self.dist.device)
        load_model_state(self.model, state["model"], path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            if self.sparse_optimizer is not None and state.get("sparse_optimizer"):
                self.sparse_optimizer.load_state_dict(state["sparse_optimizer"])
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"{path}: optimizer state does not fit this model ({error})") from error
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.progress = Progress.from_dict(state["progress"])
        self.progress.consecutive_nonfinite = 0
        ranks = state.get("ranks") or []
        if len(ranks) == self.dist.world_size:
            own = ranks[self.dist.rank]
            restore_rng(own["rng"])
            if len(own["carries"]) == len(self.carries):
                self.carries = [None if c is None else carry_from_dict(c, self.dist.device) for c in own["carries"]]
        if state.get("jd"):
            self.jd_step.load_state_dict(state["jd"])
        return self.progress.step

    # ------------------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> dict[int, Any]:
        def request_stop(signum: int, _frame: Any) -> None:
            self._stop_signal = signal.Signals(signum).name

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, request_stop)
            except ValueError:  # not the main thread
                pass
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_signal else 0.0], device=self.dist.device)
        if self.dist.world_size > 1:
            dist.all_reduce(flag)
        if flag.item() > 0 and self._stop_signal is None:
            self._stop_signal = "another rank"
        if flag.item() > 0 and self.dist.is_main:
            print(
                f"\nStopped by {self._stop_signal} at step {self.progress.step}; checkpoint written. "
                f"Resume with: python pretrain.py load_checkpoint={self.run_dir}",
                flush=True,
            )
        return flag.item() > 0

    def _progress_bar(self) -> Any:
        if not (self.dist.is_main and self.config.progress_bar):
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.progress.step, desc=self.run_name, dynamic_ncols=True)


def load_model_state(model: torch.nn.Module, state: dict[str, Tensor], source: Path | str) -> None:
    """Load weights with clear errors; a puzzle table of another size restarts from the mean of the old rows."""
    state = {key.replace("_orig_mod.", ""): value for key, value in state.items()}
    own = model.state_dict()
    table_key = "puzzle_embedding.weights"
    if table_key in state and table_key in own and state[table_key].shape != own[table_key].shape:
        old = state[table_key]
        if old.shape[1:] != own[table_key].shape[1:]:
            raise CheckpointError(
                f"{source}: checkpoint does not fit this model: puzzle embedding width {tuple(old.shape)} vs the model's {tuple(own[table_key].shape)}"
            )
        print(f"[checkpoint] puzzle embedding has {old.shape[0]} rows, the dataset needs {own[table_key].shape[0]}: re-initialised from their mean")
        state[table_key] = old.mean(dim=0, keepdim=True).expand_as(own[table_key]).clone()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        details = "; ".join(
            part
            for part in (
                f"missing {missing[:4]}" if missing else "",
                f"unexpected {unexpected[:4]}" if unexpected else "",
                f"shape mismatch {mismatched[:4]}" if mismatched else "",
            )
            if part
        )
        raise CheckpointError(f"{source}: checkpoint does not fit this model (another arch or size?): {details}")
    model.load_state_dict(state)


def _grad_norm(params: list[Tensor]) -> Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def config_to_yaml(config: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(config.model_dump(mode="json")))
