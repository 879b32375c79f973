"""The training loop: build everything from a validated config, then train, evaluate and checkpoint.

One optimizer step, on every rank::

    read the split's batches_per_step global batches (this rank's slice; one, except for a supervision
        stack with jd.supervision_loop=carry, which reads one per supervision step)
    for each micro-batch (grad_accum_steps slices of it, each with its own ACT carry):
        run the supervision steps (one ACT step each; the same_batch loop stops once all halted) -> LossTerms
        jd_step.backward(terms)                                   -> .grad of weights and puzzle rows
    jd_step.finish()                                              -> gradients reduced over ranks once
    skip the step if anything is non-finite; else AdamATan2 + sign-SGD (+ EMA)     (training/optimizers.py)

Hard-example sampling (``custom_sampling``) counts halted samples per puzzle identifier and re-weights
the next data iteration (:mod:`training.hard_sampling`); ``init_from`` loads a checkpoint's weights into a
new run (:mod:`training.init_weights`).

Reliability rules (the README's "Run directory, W&B and resuming" section says more):

* Exact resume: a checkpoint holds the model, both optimizers, the EMA, the progress (step and data
  position), every rank's RNG streams and ACT carries, the JD step's state and the hard-example counts; evaluation runs with
  the RNG streams saved and restored, so it never moves the training trajectory.
* Non-finite steps: if the loss, the JD objectives or Gramian (``JDStep.skipped_nonfinite`` moved),
  the weight gradients or the puzzle-row gradients hold a NaN or an Inf, the step is skipped: no
  optimizer, sparse-embedding or EMA update; carries that went non-finite restart. After
  ``max_nonfinite_steps`` skipped steps in a row the run stops with :class:`NonFiniteError` and writes
  nothing, so the newest checkpoint is the last good state (periodic checkpoints are only written
  after a finite step). Parameters that become non-finite after an update stop the run at once.
* Interruption: SIGTERM/SIGINT stop at the next step boundary with a checkpoint (:mod:`training.interrupt`).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from dataset.common import DatasetError
from dataset.puzzle_dataset import PuzzleDataset
from evaluators.base import Evaluator
from jd.autogram_engine import check_autogram_fits
from jd.diagnostics import reduce_step_diagnostics
from jd.splits import validate_split
from jd.step import build_jd_step
from models.ema import EMA
from models.loss_terms import LossTerms
from models.losses import ACTLossHead
from models.optimizers import cosine_schedule_with_warmup
from models.recursive_reasoning.act import ACTCarry, perturb_latent
from models.registry import build_model, compile_core
from training.atomic import atomic_write_text
from training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, load_model_state, save_checkpoint, write_failure
from training.config import ConfigError, TrainConfig, trajectory_changes
from training.distributed import DistInfo, ElasticInfo, broadcast_module_, decide_on_main, elastic_info
from training.evaluation import ExampleProgress, build_evaluators, evaluate
from training.hard_sampling import HardExampleSampler
from training.init_weights import init_weights_from, resolve_init_from
from training.interrupt import StopSignals, stopped_at_once_status
from training.logger import MetricsWriteError, RunLogger, check_wandb_config
from training.numerics import run_numerics
from training.optimizers import RunOptimizers
from training.prefetch import TrainBatches
from training.scalarizer_schedule import ScalarizerSchedule
from training.run_dir import RunDirError, RunPlan, lock_run_dir, plan_run, prepare_run_dir
from training.run_lock import RunLock
from training.state import (
    Progress,
    capture_rng,
    carry_from_dict,
    carry_is_finite,
    carry_to_dict,
    preserved_rng,
    restore_rng,
    seed_everything,
)

SUM_METRICS = ("count", "sample_steps", "accuracy", "exact_accuracy", "q_halt_accuracy", "steps", "lm_loss", "q_halt_loss", "q_continue_loss")


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row were non-finite, or an update made the parameters non-finite."""


class Trainer:
    """Owns the model, optimizers, data stream and run directory of one training run.

    Args:
        config: the validated configuration.
        dist_info: this process's rank, world size and device (:func:`training.distributed.setup_distributed`).
        elastic: ``torchrun``'s restart information; read from the environment when ``None``.

    Everything a user can get wrong (config combinations, datasets, checkpoints, run directory) is
    checked here, before the first step, and raised as ``ConfigError``, ``DatasetError``,
    ``CheckpointError`` or ``RunDirError``.
    """

    def __init__(self, config: TrainConfig, dist_info: DistInfo, elastic: ElasticInfo | None = None) -> None:
        self.config = config
        self.dist = dist_info
        self.elastic = elastic if elastic is not None else elastic_info()
        config.check_world(dist_info.world_size)
        check_wandb_config(config.wandb)
        # Where the run writes and what it restores: decided first (no side effects), by rank 0 for all.
        self.plan: RunPlan = decide_on_main(dist_info, lambda: plan_run(config, self.elastic))
        self._lock: RunLock | None = None  # rank 0 holds the run directory until the run ends (training.run_lock)
        if dist_info.is_main and self.plan.continues_run and self.plan.run_dir is not None and self.plan.run_dir.is_dir():
            self._lock = lock_run_dir(self.plan.run_dir)
            if self._lock.previous:
                print(f"note: taking the run directory over from the process that last trained in it ({self._lock.previous}; "
                      "no longer running)", flush=True)
        init_path = resolve_init_from(config.init_from) if config.init_from and self.plan.checkpoint is None else None
        seed_everything(config.seed + dist_info.rank)

        # Data (validated against its metadata before anything heavy is built).
        local_batch = config.global_batch_size // dist_info.world_size
        self.micro_batch = local_batch // config.grad_accum_steps
        epochs_per_iter = config.eval_interval or config.epochs
        self.train_data, self.eval_data = self._load_data(epochs_per_iter)
        meta = self.train_data.metadata
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
                no_act=config.arch.no_act,
                puzzle_rows_only=config.freeze_weights and config.jd.frozen_weights == "left_out",
            )
            if config.compile_enabled(dist_info.device.type):
                config.jd.check_compilable()
            self.jd_step = build_jd_step(config.jd, world_size=dist_info.world_size, halt_max_steps=config.arch.halt_max_steps)
        except (ValueError, ImportError) as error:  # ImportError: an aggregator's optional solver is missing
            raise ConfigError(str(error)) from None
        split = self.jd_step.split
        try:  # sizes the step (a scalarizer is built for the global number of objectives)
            cost = self.jd_step.prepare(
                batch_size=self.micro_batch, seq_len=meta.seq_len, H_cycles=config.arch.H_cycles, halt_max_steps=config.arch.halt_max_steps,
                grad_accum_steps=config.grad_accum_steps, device=dist_info.device,
            )
        except ValueError as error:
            raise ConfigError(str(error)) from None
        scalarizer = self.jd_step.scalarizer
        if cost and dist_info.is_main:
            print(f"note: {cost}", flush=True)
        self.supervision_steps = split.supervision_steps(config.arch.halt_max_steps)  # at most, in the same_batch loop
        self.batches_per_step = split.batches_per_step(config.arch.halt_max_steps)  # micro-batches split each batch
        estimated = max(1, self.train_data.estimated_total_batches(config.epochs) // self.batches_per_step)
        self.total_steps = min(estimated, config.max_steps) if config.max_steps else estimated

        # Model, loss head, optimizers (classes from the project's registries, never import strings).
        try:
            self.model = build_model(
                config.arch, seq_len=meta.seq_len, vocab_size=meta.vocab_size, num_puzzle_identifiers=meta.num_puzzle_identifiers, device=dist_info.device
            )
        except ValueError as error:
            raise ConfigError(str(error)) from None
        # Fine-tuning (init_from): the weights only; every rank reads them, so a bad file fails everywhere at once.
        init_notes = init_weights_from(self.model, init_path, config.model_dump(mode="json")) if init_path is not None else []
        broadcast_module_(self.model, dist_info.world_size)
        self.loss_head = ACTLossHead(
            self.model, config.arch.loss_type, differential_loss=config.jd.differential_loss,
            differential_across_samples=config.jd.differential_first_step == "replaced_sample",
        )
        if self.jd_step.engine == "autogram":
            self._check_autogram(meta.seq_len)
        self.jd_step.attach(self.model)  # only jd.engine=autogram hooks the modules
        try:
            self.optimizers = RunOptimizers(
                self.model, lr=config.lr, puzzle_emb_lr=config.puzzle_emb_lr, betas=(config.beta1, config.beta2),
                weight_decay=config.weight_decay, puzzle_emb_weight_decay=config.puzzle_emb_weight_decay,
                world_size=dist_info.world_size, freeze_weights=config.freeze_weights,
                frozen_in_jacobian=config.jd.frozen_weights == "in_jacobian" and not split.is_gd,
                extra_params=scalarizer.parameters() if scalarizer is not None else None,
            )
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self.params = self.optimizers.jacobian_params  # what the backward differentiates (frozen weights included)
        self.sampler = (
            HardExampleSampler(meta.num_puzzle_identifiers, dist_info.device, dist_info.world_size, rule=config.custom_sampling_rule)
            if config.custom_sampling
            else None
        )
        self._sampling_stats = self.sampler.apply(self.train_data) if self.sampler is not None else {}  # uniform until counted
        self.ema = EMA(self.model, config.ema_rate) if config.ema else None
        if config.compile_enabled(dist_info.device.type):
            compile_core(self.model, repeated_backward=config.jd.split != "none")
        try:
            self.evaluators: list[Evaluator] = build_evaluators(config.evaluators, config.eval_paths)
        except DatasetError:
            raise
        except ValueError as error:
            raise ConfigError(f"evaluators: {error}") from None

        self.scalarizer_schedule = ScalarizerSchedule(self.jd_step.scalarizer, self.train_data, epochs_per_iter)
        self.progress = Progress()
        self.carries: list[ACTCarry | None] = [None] * config.grad_accum_steps
        self._batches: TrainBatches | None = None  # opened at the first step, at the restored position
        self._saved_progress: dict[str, int] | None = None  # the progress of the last checkpoint written
        self._evaluated_step: int | None = None  # the step of the last evaluation in this process
        self._stop_signal: str | None = None

        # Restore (every check before the run directory is touched), then create the run directory.
        resume_step = None
        if self.plan.checkpoint is not None:
            resume_step = self._restore(self.plan.checkpoint)
        elif self.plan.continues_run:
            resume_step = 0
        self.numerics = run_numerics(dist_info.device, self.model.forward_dtype, config.compile_enabled(dist_info.device.type),
                                     dist_info.world_size)
        self.run_dir, self.run_name, self.project_name, new_lock = prepare_run_dir(config, dist_info, self.plan, self.numerics)
        self._lock = self._lock or new_lock
        if self.plan.note and dist_info.is_main:
            print(f"note: {self.plan.note}", flush=True)
        for note in init_notes if dist_info.is_main else []:
            print(f"init_from: {note}", flush=True)
        if self.plan.checkpoint is not None and dist_info.is_main:
            print(f"Resuming from {self.plan.checkpoint} (step {self.progress.step}) in {self.run_dir}", flush=True)
        self.logger = (
            RunLogger(
                self.run_dir,
                config.model_dump(mode="json") | {"numerics": self.numerics},
                config.wandb,
                self.run_name,
                self.project_name,
                resume_step=resume_step,
                redo_eval=bool(self.progress.eval_pending),
            )
            if dist_info.is_main
            else None
        )

    def _check_autogram(self, seq_len: int) -> None:
        """``jd.engine=autogram`` cannot differentiate a module used twice per backward (the TRM's
        recursion, supervision stacks): find out on one sample before training starts."""
        sample = {
            "inputs": torch.zeros(1, seq_len, dtype=torch.long, device=self.dist.device),
            "labels": torch.zeros(1, seq_len, dtype=torch.long, device=self.dist.device),
            "puzzle_identifiers": torch.zeros(1, dtype=torch.long, device=self.dist.device),
        }

        def one_step_of_forwards() -> None:
            carry = self.loss_head.initial_carry(sample)
            for _ in range(self.supervision_steps):
                carry = self._supervision_step(carry, sample, global_batch_size=1)[0]

        try:
            with preserved_rng():
                check_autogram_fits([self.model], one_step_of_forwards)
        except ValueError as error:
            raise ConfigError(f"arch={self.config.arch.name} with jd.split={self.config.jd.split}: {error}") from None
        finally:
            if self.model.puzzle_embedding is not None:
                self.model.puzzle_embedding.clear_pending()

    def _load_data(self, epochs_per_iter: int) -> tuple[PuzzleDataset, PuzzleDataset]:
        config = self.config
        kwargs: dict[str, Any] = dict(rank=self.dist.rank, world_size=self.dist.world_size, seed=config.seed)

        def load(paths: list[str], split: str, batch_size: int, **extra: Any) -> PuzzleDataset:
            try:
                return PuzzleDataset(paths, split, batch_size, **extra, **kwargs)
            except DatasetError:
                raise
            except (ValueError, TypeError, KeyError, IndexError, OSError) as error:  # malformed files the loader did not name
                raise DatasetError(f"{paths} ({split} split): malformed dataset files ({type(error).__name__}: {error})") from None

        train = load(config.data_paths, "train", config.global_batch_size, epochs_per_iter=epochs_per_iter)
        test = load(config.eval_paths, "test", config.global_batch_size // config.grad_accum_steps)
        if test.metadata.seq_len != train.metadata.seq_len or test.metadata.vocab_size != train.metadata.vocab_size:
            raise ConfigError(f"data_paths_test {config.eval_paths} do not match data_paths {config.data_paths} in seq_len / vocab_size")
        return train, test

    # ------------------------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        """Train until ``epochs`` or ``max_steps``; evaluate and checkpoint on the way. Returns the summary.

        Raises :class:`NonFiniteError` (after writing ``summary.json``) when training diverges.
        """
        config = self.config
        progress_bar = self._progress_bar()
        last_eval: dict[str, float] = {}
        status = "failed"
        try:
            with StopSignals() as signals:
                status = "finished"
                if self.progress.eval_pending:  # resumed from a checkpoint written just before an evaluation
                    last_eval = self._evaluate_and_log()
                elif self.plan.checkpoint is not None and self.progress.step >= self.total_steps:
                    last_eval = self._already_finished()
                shown_accuracy = float("nan")
                while self.progress.step < self.total_steps:
                    iteration_before = self.progress.iteration
                    metrics = self.step()
                    if metrics is None:
                        break
                    if self.logger is not None and (self.progress.step % config.log_interval == 0 or self.progress.step == 1):
                        self.logger.log(self.progress.step, metrics)
                    if progress_bar is not None:
                        progress_bar.update(1)
                        if "train/accuracy" in metrics:  # only steps where some samples halted have one
                            shown_accuracy = metrics["train/accuracy"]
                        progress_bar.set_postfix(loss=f"{metrics.get('train/lm_loss', float('nan')):.3f}", acc=f"{shown_accuracy:.3f}")
                    if self.progress.consecutive_nonfinite >= config.max_nonfinite_steps:
                        status = "stopped: non-finite"
                        raise NonFiniteError(self._nonfinite_message())

                    crossed = self.progress.iteration > iteration_before
                    epochs_done = self.progress.iteration * (config.eval_interval or config.epochs)
                    finite_step = self.progress.consecutive_nonfinite == 0  # checkpoints only after a good step
                    scheduled = crossed and config.eval_interval and epochs_done >= config.min_eval_interval
                    if (scheduled or self.progress.step in config.eval_steps) and self.progress.step < self.total_steps:
                        # Checkpoint first: a run killed during a long evaluation loses no training.
                        self.progress.eval_pending = 1
                        if config.checkpoint_every_eval and finite_step:
                            self.save()
                        last_eval = self._evaluate_and_log()
                    elif config.checkpoint_interval and self.progress.step % config.checkpoint_interval == 0 and finite_step:
                        self.save()
                    if self._stop_requested(signals):
                        status = f"interrupted by {self._stop_signal}"
                        path = self.save()
                        if self.dist.is_main:
                            print(f"\nStopped by {self._stop_signal} at step {self.progress.step}; checkpoint {path}", flush=True)
                        break
                if status == "finished":
                    if self._evaluated_step != self.progress.step:
                        self.progress.eval_pending = 1
                        self.save()
                        last_eval = self._evaluate_and_log()
                    self.save()  # the same step, now with its evaluation done
        except NonFiniteError:
            status = "stopped: non-finite"
            raise
        except MetricsWriteError as error:
            status = "stopped: metrics.jsonl could not be written"
            raise RunDirError(f"{error.strerror}; training stopped at step {self.progress.step}: {self._kept_phrase()}") from None
        except BaseException as error:
            if status == "finished":
                status = stopped_at_once_status(error) or f"failed: {type(error).__name__}"
            raise
        finally:
            if progress_bar is not None:
                progress_bar.close()
            if self._batches is not None:
                self._batches.close()
            summary = {"status": status, "final_step": self.progress.step, "run_dir": str(self.run_dir), "eval": last_eval}
            latest = latest_checkpoint(self.run_dir) if self.dist.is_main else None
            summary["checkpoint"] = None if latest is None else str(latest)
            summary["skipped_nonfinite"] = self.progress.skipped_nonfinite
            summary["numerics"] = self.numerics
            if self.dist.is_main:
                try:
                    atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
                except OSError as error:  # the disk that failed the run fails this too: say so, keep the first error
                    print(f"note: summary.json not written ({write_failure(self.run_dir, error)})", flush=True)
                finally:
                    if self.logger is not None:
                        self.logger.close()
                    if self._lock is not None:
                        self._lock.release()
        if self.dist.world_size > 1:
            dist.barrier()  # leave together: a rank tearing down its process group early can abort the others
        return summary

    def _already_finished(self) -> dict[str, float]:
        """A resumed run whose last checkpoint already holds its final step and evaluation: nothing to train,
        evaluate or write again (the evaluation stays the one logged); returns that evaluation."""
        self._evaluated_step = self.progress.step
        if self.dist.is_main:
            print(f"note: the run already finished at step {self.progress.step} (its final evaluation is logged); "
                  "nothing to do: raise epochs or max_steps to train further", flush=True)
        try:
            previous = json.loads((self.run_dir / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return dict(previous.get("eval") or {}) if isinstance(previous, dict) else {}

    def step(self) -> dict[str, float] | None:
        """Run one optimizer step (or skip it if anything is non-finite) and advance the progress.

        Returns the step's ``train/...`` metrics, or ``None`` when the data stream is exhausted.
        Raises :class:`NonFiniteError` when an update leaves the parameters non-finite.
        """
        if self._batches is None:
            self._batches = self._batch_stream()
        before = (self.progress.iteration, self.progress.batch_in_iteration)
        step_batches = [self._batches.next() for _ in range(self.batches_per_step)]
        if any(batch is None for batch in step_batches):
            return None
        metrics = self._train_step(step_batches)  # type: ignore[arg-type]
        metrics["train/data_wait_s"] = self._batches.take_wait()
        self.progress.step += 1
        self.scalarizer_schedule.after_step(before, (self.progress.iteration, self.progress.batch_in_iteration))
        return metrics

    def _micro_step(
        self, micro: int, rows: slice, batches: list[dict[str, Tensor]], step_terms: list[LossTerms], sums: Tensor, rows_before: int
    ) -> dict[str, float]:
        """Forward this micro-batch's supervision steps (adding their metrics to ``sums``), then its JD/GD backward.

        With the ACT carry each of ``batches`` feeds one step; in the ``same_batch`` loop (the study's
        supervision stacks) the one batch runs from a fresh carry until every sample has halted."""
        config, split = self.config, self.jd_step.split
        schedule = batches * self.supervision_steps if split.same_batch_loop else batches
        stack_noise = config.jd.carry_perturbation == "stack_steps" and split.is_supervision_stack
        if split.same_batch_loop and not (self.carries[micro] is not None and bool(self.carries[micro].halted.all())):
            self.carries[micro] = None  # a carry whose samples all halted loads the new batch whole: kept (its logits)
        embedding = self.model.puzzle_embedding
        sharing = embedding.share_rows(config.jd.puzzle_rows == "shared_in_stack" and split.same_batch_loop) if embedding else nullcontext()
        with sharing:
            for batch in schedule:
                micro_batch = {key: value[rows].to(self.dist.device, non_blocking=True) for key, value in batch.items()}
                if self.carries[micro] is None:
                    self.carries[micro] = self.loss_head.initial_carry(micro_batch)
                carry, terms, metrics, outputs, _ = self._supervision_step(self.carries[micro], micro_batch, config.global_batch_size)
                self.carries[micro] = perturb_latent(carry, config.jd.carry_perturbation_rate) if stack_noise else carry
                step_terms.append(terms)
                metrics["sample_steps"] = torch.tensor(float(carry.halted.shape[0]), device=sums.device)
                sums += torch.stack([metrics[name].float() if name in metrics else sums.new_zeros(()) for name in SUM_METRICS])
                if self.sampler is not None:
                    self._observe_for_sampling(micro_batch, carry, outputs["exact"], after_stack=False)
                if split.same_batch_loop and self._all_halted(carry):
                    break
        if self.sampler is not None and split.is_supervision_stack:
            self._observe_for_sampling(micro_batch, carry, outputs["exact"], after_stack=True)
        if split.same_batch_loop and not bool(self.carries[micro].halted.all()):
            self.carries[micro] = None  # the next step starts from a fresh carry on its own batch
        puzzle_rows = [r for _, r in embedding.pending_rows()[rows_before:]] if embedding is not None else []
        return self.jd_step.backward(step_terms, self.params, puzzle_rows)

    def _observe_for_sampling(self, batch: dict[str, Tensor], carry: ACTCarry, exact: Tensor, *, after_stack: bool) -> None:
        """Hard-example counts, called after every supervision step and once more after a supervision stack
        (``after_stack``): the halted samples by their own identifier at every step, or with
        ``custom_sampling_rule=study`` the study's crediting of the incoming batch, once per stack."""
        assert self.sampler is not None
        if self.sampler.rule == "halted":
            if not after_stack:
                self.sampler.observe(carry.data["puzzle_identifiers"], carry.halted, exact)
        elif after_stack or not self.jd_step.split.is_supervision_stack:
            self.sampler.observe_incoming(batch["puzzle_identifiers"], carry.halted, exact)

    def _recompute_objectives(self, batches: list[dict[str, Tensor]], carries: list[ACTCarry | None], rng: dict[str, Any]) -> None:
        """FAMO: the step's objectives again after the update, from the same carry, batch and random
        draws, without gradient and without moving the training trajectory (one micro-batch)."""
        steps = []
        with torch.no_grad(), preserved_rng():
            restore_rng(rng)
            carry = carries[0]
            for batch in batches:
                micro_batch = {key: value.to(self.dist.device, non_blocking=True) for key, value in batch.items()}
                carry = self.loss_head.initial_carry(micro_batch) if carry is None else carry
                carry, terms, _, _, _ = self._supervision_step(carry, micro_batch, self.config.global_batch_size)
                steps.append(terms)
        self.jd_step.recomputed(steps)

    def _supervision_step(
        self, carry: ACTCarry, batch: dict[str, Tensor], global_batch_size: int
    ) -> tuple[ACTCarry, LossTerms, dict[str, Tensor], dict[str, Tensor], Tensor]:
        """One ACT step of the loss head with what the split needs (per-cycle graphs and losses) and the
        configured carry noise."""
        split, jd = self.jd_step.split, self.config.jd
        return self.loss_head(
            carry, batch, global_batch_size=global_batch_size, keep_cycle_logits=split.needs_cycle_logits,
            differential_cycles=split.needs_differential_cycles,
            carry_noise=jd.carry_perturbation_rate if jd.carry_perturbation == "carried_samples" else 0.0,
        )

    def _all_halted(self, carry: ACTCarry) -> bool:
        """Whether every sample has halted, agreed by all ranks when they aggregate one Jacobian (its m must agree)."""
        done = carry.halted.all().float().reshape(1)
        if self.jd_step.exact_global:
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        return bool(done.item())

    def accumulate_gradients(self, batches: list[dict[str, Tensor]]) -> tuple[Tensor, list[dict[str, float]]]:
        """The forwards and backward of one optimizer step, without the update: ``.grad`` of the weights and
        of the puzzle rows (pending in the embedding) hold the step's update. Returns the summed metrics
        (:data:`SUM_METRICS`, this rank) and each micro-batch's ``jd/*`` metrics."""
        self.model.train()
        sums = torch.zeros(len(SUM_METRICS), device=self.dist.device)
        micro_metrics: list[dict[str, float]] = []
        for micro in range(self.config.grad_accum_steps):
            rows = slice(micro * self.micro_batch, (micro + 1) * self.micro_batch)
            embedding = self.model.puzzle_embedding
            rows_before = len(embedding.pending_rows()) if embedding is not None else 0
            with self.jd_step.forward_context(self.model, self.micro_batch):
                micro_metrics.append(self._micro_step(micro, rows, batches, [], sums, rows_before))
        self.jd_step.finish(self.optimizers.params)
        return sums, micro_metrics

    def _train_step(self, batches: list[dict[str, Tensor]]) -> dict[str, float]:
        config = self.config
        started = time.perf_counter()
        scalarizer = self.jd_step.scalarizer
        recompute = (list(self.carries), capture_rng()) if scalarizer is not None and scalarizer.updates_after_step else None
        lr_scale = cosine_schedule_with_warmup(
            self.progress.step, base_lr=1.0, warmup_steps=config.lr_warmup_steps, total_steps=self.total_steps, min_ratio=config.lr_min_ratio
        )
        jd_skipped_before = self.jd_step.skipped_nonfinite
        sums, micro_metrics = self.accumulate_gradients(batches)
        # jd/* describe the optimizer step: every micro-batch's and every rank's update (mean; min/max for extremes).
        jd_metrics = reduce_step_diagnostics(micro_metrics, self.dist.world_size, self.dist.device) if not self.jd_step.split.is_gd else {}
        local_bad = torch.zeros(1, device=self.dist.device)  # non-finite signs only this rank can see
        grad_norm = _grad_norm(self.optimizers.params)
        if self.jd_step.skipped_nonfinite > jd_skipped_before:  # non-finite objectives, Gramian or update
            local_bad += 1
        if self.model.puzzle_embedding is not None:
            for _, pending in self.model.puzzle_embedding.pending_rows():
                if pending.grad is not None:
                    local_bad += (~torch.isfinite(pending.grad)).any()
        checks = torch.cat([sums, local_bad])
        if self.dist.world_size > 1:
            dist.all_reduce(checks)
        sums = checks[:-1]
        finite = bool(torch.isfinite(grad_norm.to(checks.device)) & torch.isfinite(checks).all() & (checks[-1] == 0))  # one sync
        if finite:
            if config.grad_clip_norm is not None and self.optimizers.params:
                torch.nn.utils.clip_grad_norm_(self.optimizers.params, config.grad_clip_norm)
            self.optimizers.step(lr_scale)
            if not self.optimizers.weights_finite():
                raise NonFiniteError(
                    f"the update of step {self.progress.step + 1} made the parameters non-finite (lr={config.lr} too high?); "
                    f"stopped without saving: {self._latest_checkpoint_phrase()}"
                )
            if self.ema is not None:
                self.ema.update(self.model)
            if recompute is not None:
                self._recompute_objectives(batches, *recompute)
            self.progress.consecutive_nonfinite = 0
        else:
            self.progress.skipped_nonfinite += 1
            self.progress.consecutive_nonfinite += 1
            if self.model.puzzle_embedding is not None:
                self.model.puzzle_embedding.clear_pending()
            # A carry that went non-finite would poison its samples' next steps: restart it.
            self.carries = [None if carry is None or not carry_is_finite(carry) else carry for carry in self.carries]
        self.optimizers.zero_grad()

        values = dict(zip(SUM_METRICS, sums.tolist()))
        halted = values.pop("count")
        loss_divisor = values.pop("sample_steps")  # samples x supervision steps run, over all ranks
        # Losses cover every sample; accuracy, exact_accuracy, q_halt_accuracy and steps average over the
        # samples that halted at this step, and are left out of the record when none did.
        out = {
            f"train/{name}": value / (loss_divisor if name.endswith("loss") else halted)
            for name, value in values.items()
            if name.endswith("loss") or halted > 0
        }
        out["train/halted_count"] = halted
        out["train/lr"] = config.lr * lr_scale
        out["train/grad_norm"] = float(grad_norm)
        out["train/skipped_nonfinite"] = float(self.progress.skipped_nonfinite)
        out["train/step_time_s"] = time.perf_counter() - started
        out.update(jd_metrics)
        out.update(self._sampling_stats)
        return out

    def _nonfinite_message(self) -> str:
        first = self.progress.step - self.progress.consecutive_nonfinite + 1
        return (
            f"{self.progress.consecutive_nonfinite} optimizer steps in a row (steps {first}-{self.progress.step}) had non-finite "
            f"losses, objectives or gradients (max_nonfinite_steps={self.config.max_nonfinite_steps}); they were skipped and "
            f"the run stopped without saving: {self._latest_checkpoint_phrase()}"
        )

    def _kept_phrase(self) -> str:
        """What a run stopped by a write failure kept: its newest checkpoint, and what is lost after it."""
        latest = latest_checkpoint(self.run_dir)
        if latest is None:
            return "no checkpoint had been written yet; free space and start again"
        return (f"the newest checkpoint is {latest} (step {int(latest.stem.removeprefix('step_'))}); the steps after it are not saved. "
                "Free space and resume with resume=true (they are recomputed identically)")

    def _latest_checkpoint_phrase(self) -> str:
        latest = latest_checkpoint(self.run_dir)
        if latest is None:
            return "no checkpoint had been written yet"
        return f"the newest checkpoint, {latest}, holds the last good state (lower lr, or set grad_clip_norm, and resume from it)"

    # ------------------------------------------------------------------------------- data
    def _batch_stream(self) -> TrainBatches:
        """Global batches (this rank's slice) from the current data position, read ahead on CUDA."""
        depth = self.config.prefetch_batches
        if depth is None:
            depth = 2 if self.dist.device.type == "cuda" else 0
        return TrainBatches(self.progress, self.total_iterations, self.train_data.train_batches,
                            self._end_iteration, depth, self.dist.device)

    def _end_iteration(self) -> None:
        """After an iteration's last batch: hard-example sampling draws the next iterations by the counts so far."""
        if self.sampler is not None:
            self.sampler.end_iteration()
            self._sampling_stats = self.sampler.apply(self.train_data)

    # -------------------------------------------------------------------------- evaluation
    def _evaluate_and_log(self) -> dict[str, float]:
        context = self.ema.swapped_into(self.model) if self.ema is not None else nullcontext()
        save_dir = self.run_dir / "eval" / f"step_{self.progress.step:08d}"
        with context, preserved_rng():  # evaluation never moves the training trajectory
            results = evaluate(
                self.loss_head,
                ExampleProgress(self.eval_data, max_batches=self.config.eval_max_batches, enabled=self.dist.is_main and self.config.progress_bar),
                self.evaluators,
                self.dist,
                global_batch_size=self.config.global_batch_size,
                max_batches=self.config.eval_max_batches,
                save_dir=save_dir if self.dist.is_main else None,
            )
        self.progress.evaluations += 1
        self.progress.eval_pending = 0
        self._evaluated_step = self.progress.step
        if self.logger is not None and results:
            self.logger.log(self.progress.step, results)
            if self.config.progress_bar:
                shown = {k: round(v, 4) for k, v in results.items() if "accuracy" in k or "pass@" in k}
                print(f"[eval step {self.progress.step}] {shown}", flush=True)
        return results

    # ------------------------------------------------------------------------- checkpoints
    def save(self) -> Path | None:
        """Write the full training state (all ranks take part; rank 0 writes). Returns the path on rank 0.

        A second call with the same progress writes nothing again.
        """
        if self._saved_progress == self.progress.to_dict():
            return latest_checkpoint(self.run_dir) if self.dist.is_main else None
        if self.sampler is not None:
            self.sampler.sync()  # every rank's counts into the totals the checkpoint keeps
        carries = [None if carry is None else carry_to_dict(carry) for carry in self.carries]
        rank_state = {"rng": capture_rng(), "carries": carries}
        gathered: list[Any] = [rank_state]
        if self.dist.world_size > 1:
            gathered = [None] * self.dist.world_size
            dist.all_gather_object(gathered, rank_state)
        self._saved_progress = self.progress.to_dict()
        if not self.dist.is_main:
            return None
        state = {
            "model": self.model.state_dict(),
            **self.optimizers.state_dict(),
            "sampler": None if self.sampler is None else self.sampler.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "progress": self.progress.to_dict(),
            "ranks": gathered,
            "jd": self.jd_step.state_dict(),
            "config": self.config.model_dump(mode="json"),
            "data": {"seq_len": self.train_data.metadata.seq_len, "vocab_size": self.train_data.metadata.vocab_size, "num_puzzle_identifiers": self.train_data.metadata.num_puzzle_identifiers},
        }
        return save_checkpoint(state, self.run_dir, self.progress.step, self.config.keep_last)

    def _restore(self, path: Path) -> int:
        """Load the full training state of ``path``; every mismatch is a :class:`CheckpointError`."""
        state = load_checkpoint(path, map_location=self.dist.device)
        missing = [key for key in ("optimizer", "progress") if not isinstance(state.get(key), dict)]
        if missing:
            raise CheckpointError(f"{path}: not a training checkpoint (it lacks {missing}); it cannot be resumed")
        if isinstance(state.get("config"), dict) and self.dist.is_main:
            changes = trajectory_changes(state["config"], self.config.model_dump(mode="json"))
            if changes:
                print(
                    f"note: resuming {path.name} with settings that differ from its own ({'; '.join(changes[:8])}); training "
                    "continues with the new ones, so it will not match an uninterrupted run of the old ones",
                    flush=True,
                )
        load_model_state(self.model, state["model"], path)
        try:
            self.optimizers.load_state_dict(state)
            if self.sampler is not None and state.get("sampler"):
                self.sampler.load_state_dict(state["sampler"])
        except (ValueError, KeyError, TypeError, RuntimeError) as error:
            raise CheckpointError(f"{path}: optimizer or sampler state does not fit this run ({error})") from error
        if self.sampler is not None:
            self._sampling_stats = self.sampler.apply(self.train_data)
        if self.ema is not None:
            if state.get("ema") is None:
                self.ema = EMA(self.model, self.config.ema_rate)  # the run had no EMA: start it from the loaded weights
            else:
                try:
                    self.ema.load_state_dict(state["ema"])
                except (ValueError, RuntimeError) as error:
                    raise CheckpointError(f"{path}: EMA weights do not fit this model ({error})") from error
        try:
            self.progress = Progress.from_dict(state["progress"])
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{path}: unreadable progress {state['progress']!r} ({error})") from error
        self._check_data_position(path)
        self._restore_rank_state(state.get("ranks") or [], path)
        if state.get("jd"):
            try:
                self.jd_step.load_state_dict(state["jd"])
            except (KeyError, TypeError, RuntimeError, ValueError) as error:
                raise CheckpointError(f"{path}: JD state does not fit ({error})") from error
        self._saved_progress = self.progress.to_dict() if self.plan.continues_run else None
        return self.progress.step

    def _check_data_position(self, path: Path) -> None:
        progress = self.progress
        if progress.iteration >= self.total_iterations:
            return
        available = self.train_data.num_train_batches(progress.iteration)
        if progress.batch_in_iteration > available:
            raise CheckpointError(
                f"{path}: its data position (iteration {progress.iteration}, batch {progress.batch_in_iteration}) does not exist "
                f"with these data_paths / global_batch_size / eval_interval ({available} batches per iteration); resume with "
                "the settings the checkpoint was trained with"
            )

    def _restore_rank_state(self, ranks: list[Any], path: Path) -> None:
        """RNG streams and ACT carries of this rank, when the checkpoint was written by as many ranks."""
        if len(ranks) != self.dist.world_size:
            if self.dist.is_main:
                print(f"note: {path.name} was written by {len(ranks)} rank(s), this run has {self.dist.world_size}: RNG streams and ACT carries start fresh")
            return
        own = ranks[self.dist.rank]
        restore_rng(own["rng"])
        saved = own.get("carries") or []
        if len(saved) == len(self.carries) and all(c is None or self._carry_fits(c) for c in saved):
            dtype = self.model.forward_dtype
            self.carries = [None if c is None else carry_from_dict(c, self.dist.device, latent_dtype=dtype) for c in saved]
        elif self.dist.is_main:
            print(f"note: the ACT carries of {path.name} do not fit this batch layout (global_batch_size / grad_accum_steps changed?): they start fresh")

    def _carry_fits(self, saved: dict[str, Any]) -> bool:
        meta = self.train_data.metadata
        latent_shape = (self.micro_batch, meta.seq_len + self.model.puzzle_emb_len, self.config.arch.hidden_size)
        data = saved.get("data") or {}
        return (
            tuple(saved["z_H"].shape) == latent_shape
            and tuple(saved["z_L"].shape) == latent_shape
            and "inputs" in data
            and tuple(data["inputs"].shape) == (self.micro_batch, meta.seq_len)
            and (saved.get("prev_logits") is not None) == self.config.jd.differential_loss
        )

    # ------------------------------------------------------------------------------ signals
    def _stop_requested(self, signals: StopSignals) -> bool:
        """Whether any rank received SIGTERM/SIGINT (one small all-reduce per step when distributed)."""
        received = signals.received
        if self.dist.world_size > 1:
            flag = torch.tensor([1.0 if received else 0.0], device=self.dist.device)
            dist.all_reduce(flag)
            if flag.item() > 0 and received is None:
                received = "a signal on another rank"
        if received:
            self._stop_signal = received
        return received is not None

    def _progress_bar(self) -> Any:
        if not (self.dist.is_main and self.config.progress_bar):
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.progress.step, desc=self.run_name, dynamic_ncols=True)


def _grad_norm(params: list[Tensor]) -> Tensor:
    """The global 2-norm of the gradients (non-finite when one of them holds a NaN or an Inf)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))

