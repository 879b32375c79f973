"""The training loop: wires the run's components together, then trains, evaluates and checkpoints.

One optimizer step (:meth:`Trainer.step`) on every rank, and the file each part lives in::

    data_feed.DataFeed.next_batches               the step's global batches (this rank's slice)
    for each micro-batch (grad_accum_steps slices):
        supervision.SupervisionLoop.train_micro_batch   its ACT supervision steps -> LossTerms (models/losses.py)
        jd/step.py JDStep.backward                      GD, or JD through an engine: .grad of weights and puzzle rows
    jd/step.py JDStep.finish                      gradients reduced over ranks once; reports skipped micro-batches
    nonfinite.NonFiniteGuard.check                skip the step if anything is non-finite (one all-reduce)
    optimizers.RunOptimizers.step                 AdamATan2 + sign-SGD (+ EMA, models/ema.py)
    train_metrics.train_metrics                   the train/* record

The components own their state and register it with the :class:`~training.checkpointer.Checkpointer`
(model, optimizers, EMA, progress, data feed, JD step; per rank: RNG streams and ACT carries), which also
decides when a checkpoint is due; :class:`~training.cadence.Cadence` decides when to log and evaluate.

Reliability rules (the README's "Run directory, W&B and resuming" section says more): a checkpoint
resumes exactly (evaluation runs with the RNG streams saved and restored); a non-finite step is skipped
and too many in a row stop the run without saving (:mod:`training.nonfinite`); SIGTERM/SIGINT stop at the
next step boundary with a checkpoint (:mod:`training.interrupt`).
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from evaluators.base import Evaluator
from jd.diagnostics import reduce_step_diagnostics
from models.ema import EMA
from models.optimizers import cosine_schedule_with_warmup
from models.registry import compile_core
from dataset.atomic import atomic_write_text
from training.build import check_autogram, evaluators_for, jd_step_for, loss_head_for, model_for, optimizers_for
from training.cadence import Cadence
from dataset.atomic import write_failure
from training.checkpointer import NO_STATE, Checkpointer, ModelWeights, RngStreams
from training.config import TrainConfig
from training.data_feed import DataFeed, on_device
from training.distributed import DistInfo, ElasticInfo, elastic_info, stop_requested
from training.evaluation import ExampleProgress, evaluate
from training.init_weights import resolve_init_from
from training.interrupt import StopSignals, stopped_at_once_status
from training.logger import MetricsWriteError, RunLogger, check_wandb_config
from training.nonfinite import NonFiniteError, NonFiniteGuard
from training.numerics import run_numerics
from training.run_dir import RunDirError, claim_run, prepare_run_dir
from training.scalarizer_schedule import ScalarizerSchedule
from training.state import Progress, capture_rng, preserved_rng, seed_everything
from training.supervision import SupervisionLoop
from training.train_metrics import StepRecorder, train_metrics

__all__ = ["NonFiniteError", "Trainer"]


class Accumulated(NamedTuple):
    """An optimizer step's backward: the summed metrics (this rank), the ``jd/*`` metrics, and whether the JD
    step skipped a micro-batch as non-finite."""

    sums: Tensor
    jd_metrics: dict[str, float]
    jd_skipped: bool


class Trainer:
    """Builds the components of one training run from a validated config and runs them.

    Args:
        config: the validated configuration.
        dist_info: this process's rank, world size and device (:func:`training.distributed.setup_distributed`).
        elastic: ``torchrun``'s restart information; read from the environment when ``None``.

    Everything a user can get wrong (config combinations, datasets, checkpoints, run directory) is
    checked here, before the first step, and raised as ``ConfigError``, ``DatasetError``,
    ``CheckpointError`` or ``RunDirError``.
    """

    def __init__(self, config: TrainConfig, dist_info: DistInfo, elastic: ElasticInfo | None = None) -> None:
        self.config, self.dist = config, dist_info
        config.check_world(dist_info.world_size)
        check_wandb_config(config.wandb)
        self.plan, self._lock = claim_run(config, dist_info, elastic if elastic is not None else elastic_info())
        init_path = resolve_init_from(config.init_from) if config.init_from and self.plan.checkpoint is None else None
        seed_everything(config.seed + dist_info.rank)
        self.progress = Progress()
        self.data = DataFeed(config, dist_info, self.progress)  # validated before anything heavy is built
        self.jd_step = jd_step_for(config, dist_info, self.data)
        self.supervision_steps = self.jd_step.split.supervision_steps(config.arch.halt_max_steps)
        self.batches_per_step = self.jd_step.split.batches_per_step(config.arch.halt_max_steps)
        estimated = self.data.estimated_steps(self.batches_per_step)
        self.total_steps = min(estimated, config.max_steps) if config.max_steps else estimated
        self.model, init_notes = model_for(config, dist_info, self.data, init_path)
        self.loss_head = loss_head_for(config, self.model)
        self.supervision = self._supervision_loop()
        if self.jd_step.engine == "autogram":
            check_autogram(config, self.supervision, self.data.train.metadata.seq_len, dist_info.device)
        self.jd_step.attach(self.model)  # only jd.engine=autogram hooks the modules
        self.optimizers = optimizers_for(config, self.model, dist_info, self.jd_step)
        self.params = self.optimizers.jacobian_params  # what the backward differentiates (frozen weights included)
        self.ema = EMA(self.model, config.ema_rate) if config.ema else None
        if config.compile_enabled(dist_info.device.type):
            compile_core(self.model, repeated_backward=config.jd.split != "none")
        self.evaluators: list[Evaluator] = evaluators_for(config)
        self.scalarizer_schedule = ScalarizerSchedule(self.jd_step.scalarizer, self.data.train, self.data.epochs_per_iter)
        self.cadence = Cadence(config, self.total_steps)
        self.guard = NonFiniteGuard(config.max_nonfinite_steps, dist_info.world_size)
        self.checkpointer = self._checkpointer()
        self._evaluated_step: int | None = None  # the step of the last evaluation in this process
        self._open_run(init_notes)

    def _supervision_loop(self) -> SupervisionLoop:
        meta, arch = self.data.train.metadata, self.config.arch
        return SupervisionLoop(
            self.loss_head, self.jd_step.split, self.config.jd, global_batch_size=self.config.global_batch_size,
            grad_accum_steps=self.config.grad_accum_steps, halt_max_steps=arch.halt_max_steps, agree_on_halting=self.jd_step.exact_global,
            carry_shape=(self.data.micro_batch, meta.seq_len, meta.seq_len + self.model.puzzle_emb_len, arch.hidden_size),
            device=self.dist.device, is_main=self.dist.is_main,
        )

    def _checkpointer(self) -> Checkpointer:
        """The checkpointer, with every component's state registered (restored in this order)."""
        config, meta = self.config, self.data.train.metadata
        checkpointer = Checkpointer(
            self.dist, keep_last=config.keep_last, interval=config.checkpoint_interval, every_eval=config.checkpoint_every_eval,
            static={"config": config.model_dump(mode="json"),
                    "data": {"seq_len": meta.seq_len, "vocab_size": meta.vocab_size, "num_puzzle_identifiers": meta.num_puzzle_identifiers}},
        )
        checkpointer.register("model", ModelWeights(self.model), "the model's weights")
        checkpointer.register("optimizer", self.optimizers, "the optimizer state", spread=True)
        ema = self.ema
        checkpointer.register("ema", ema or NO_STATE, "the EMA weights",  # a run without EMA: start it from the loaded weights
                              on_absent=(lambda: ema.reset(self.model)) if ema is not None else NO_STATE.load_state_dict)
        checkpointer.register("progress", self.progress, "the progress record")
        checkpointer.register("sampler", self.data, "the data position and hard-example counts", on_absent=self.data.check_position)
        checkpointer.register("jd", self.jd_step, "the JD step's state", on_absent=NO_STATE.load_state_dict)
        checkpointer.register_rank("rng", RngStreams(), "the RNG streams")
        checkpointer.register_rank("carries", self.supervision, "the ACT carries")
        return checkpointer

    def _open_run(self, init_notes: list[str]) -> None:
        """Restore the planned checkpoint (every check before the run directory is touched), then create the
        run directory and its logger."""
        config, dist_info, plan = self.config, self.dist, self.plan
        resume_step = None
        if plan.checkpoint is not None:
            self.checkpointer.restore(plan.checkpoint, same_run=plan.continues_run)
            resume_step = self.progress.step
        elif plan.continues_run:
            resume_step = 0
        self.numerics = run_numerics(dist_info.device, self.model.forward_dtype, config.compile_enabled(dist_info.device.type),
                                     dist_info.world_size)
        self.run_dir, self.run_name, self.project_name, new_lock = prepare_run_dir(config, dist_info, plan, self.numerics)
        self._lock = self._lock or new_lock
        self.checkpointer.attach(self.run_dir)
        self.logger: RunLogger | None = None
        if not dist_info.is_main:
            return
        for note in ([plan.note] if plan.note else []) + [f"init_from: {note}" for note in init_notes]:
            print(note if note.startswith("init_from") else f"note: {note}", flush=True)
        if plan.checkpoint is not None:
            print(f"Resuming from {plan.checkpoint} (step {self.progress.step}) in {self.run_dir}", flush=True)
        self.logger = RunLogger(self.run_dir, config.model_dump(mode="json") | {"numerics": self.numerics}, config.wandb,
                                self.run_name, self.project_name, resume_step=resume_step, redo_eval=bool(self.progress.eval_pending))

    # ------------------------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        """Train until ``epochs`` or ``max_steps``; evaluate and checkpoint on the way. Returns the summary.

        Raises :class:`NonFiniteError` (after writing ``summary.json``) when training diverges.
        """
        progress_bar = self._progress_bar()
        last_eval: dict[str, float] = {}
        status = "failed"
        try:
            with StopSignals() as signals:
                status = "finished"
                last_eval = self._catch_up()
                while not self.cadence.finished(self.progress):
                    iteration_before = self.progress.iteration
                    metrics = self.step()
                    if metrics is None:
                        break
                    self._report(metrics, progress_bar)
                    if self.guard.too_many(self.progress):
                        raise NonFiniteError(self.guard.message(self.progress, self.checkpointer.last_good_phrase()))
                    last_eval = self._after_step(iteration_before) or last_eval
                    signal_name = stop_requested(signals, self.dist.world_size, self.dist.device)
                    if signal_name:
                        status = f"interrupted by {signal_name}"
                        self._save_on_stop(signal_name)
                        break
                if status == "finished":
                    last_eval = self._final_evaluation() or last_eval
        except NonFiniteError:
            status = "stopped: non-finite"
            raise
        except MetricsWriteError as error:
            status = "stopped: metrics.jsonl could not be written"
            raise RunDirError(f"{error.strerror}; training stopped at step {self.progress.step}: {self.checkpointer.kept_phrase()}") from None
        except BaseException as error:
            if status == "finished":
                status = stopped_at_once_status(error) or f"failed: {type(error).__name__}"
            raise
        finally:
            summary = self._close(status, last_eval, progress_bar)
        if self.dist.world_size > 1:
            dist.barrier()  # leave together: a rank tearing down its process group early can abort the others
        return summary

    def _catch_up(self) -> dict[str, float]:
        """Before the first step of a resumed run: redo an evaluation the checkpoint was written for, or say
        that the run already finished. Returns the evaluation (empty when there is none)."""
        if self.progress.eval_pending:
            return self._evaluate()
        if self.plan.checkpoint is None or not self.cadence.finished(self.progress):
            return {}
        self._evaluated_step = self.progress.step
        if self.dist.is_main:
            print(f"note: the run already finished at step {self.progress.step} (its final evaluation is logged); "
                  "nothing to do: raise epochs or max_steps to train further", flush=True)
        try:
            previous = json.loads((self.run_dir / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return dict(previous.get("eval") or {}) if isinstance(previous, dict) else {}

    def _after_step(self, iteration_before: int) -> dict[str, float]:
        """Evaluate when due (a checkpoint first: a run killed during a long evaluation loses no training),
        else checkpoint when due. Returns the evaluation, if one ran."""
        finite = self.progress.consecutive_nonfinite == 0
        if self.cadence.evaluation_due(self.progress, iteration_before):
            self.progress.eval_pending = 1
            if self.checkpointer.due(self.progress.step, before_eval=True, finite=finite):
                self.checkpointer.save(self.progress)
            return self._evaluate()
        if self.checkpointer.due(self.progress.step, before_eval=False, finite=finite):
            self.checkpointer.save(self.progress)
        return {}

    def _final_evaluation(self) -> dict[str, float]:
        """The last step's evaluation (unless it just ran), with a checkpoint before and after it."""
        results: dict[str, float] = {}
        if self._evaluated_step != self.progress.step:
            self.progress.eval_pending = 1
            self.checkpointer.save(self.progress)
            results = self._evaluate()
        self.checkpointer.save(self.progress)  # the same step, now with its evaluation done
        return results

    def _save_on_stop(self, signal_name: str) -> None:
        path = self.checkpointer.save(self.progress)
        if self.dist.is_main:
            print(f"\nStopped by {signal_name} at step {self.progress.step}; checkpoint {path}", flush=True)

    def save(self) -> Any:
        """Write a checkpoint of the current state now (all ranks call it); its path on rank 0."""
        return self.checkpointer.save(self.progress)

    # ------------------------------------------------------------------------------------ step
    def step(self) -> dict[str, float] | None:
        """Run one optimizer step (or skip it if anything is non-finite) and advance the progress.

        Returns the step's ``train/...`` metrics, or ``None`` when the data stream is exhausted.
        Raises :class:`NonFiniteError` when an update leaves the parameters non-finite.
        """
        before = (self.progress.iteration, self.progress.batch_in_iteration)
        batches = self.data.next_batches(self.batches_per_step)
        if batches is None:
            return None
        started = time.perf_counter()
        scalarizer = self.jd_step.scalarizer
        updates_after = scalarizer is not None and scalarizer.updates_after_step  # FAMO (grad_accum_steps=1)
        famo = (self.supervision.carries[0], capture_rng()) if updates_after else None
        lr_scale = cosine_schedule_with_warmup(self.progress.step, base_lr=1.0, warmup_steps=self.config.lr_warmup_steps,
                                               total_steps=self.total_steps, min_ratio=self.config.lr_min_ratio)
        result = self.accumulate_gradients(batches)
        finite, sums, grad_norm = self.guard.check(result.sums, self.optimizers.params, jd_skipped=result.jd_skipped,
                                                   puzzle_row_grads=self._puzzle_row_grads())
        if finite:
            self._update(lr_scale)
            if famo is not None:
                self.jd_step.recomputed(self.supervision.recompute(self._on_device(batches, slice(None)), *famo))
        else:
            self._skip()
        self.guard.record(self.progress, finite)
        self.optimizers.zero_grad()
        self.progress.step += 1
        self.scalarizer_schedule.after_step(before, (self.progress.iteration, self.progress.batch_in_iteration))
        extra = {**result.jd_metrics, **self.data.sampling_stats, "train/data_wait_s": self.data.take_wait()}
        return train_metrics(sums, lr=self.config.lr * lr_scale, grad_norm=float(grad_norm), skipped_nonfinite=self.progress.skipped_nonfinite,
                             step_time_s=time.perf_counter() - started, extra=extra)

    def accumulate_gradients(self, batches: list[dict[str, Tensor]]) -> Accumulated:
        """The forwards and backward of one optimizer step, without the update: ``.grad`` of the weights and
        of the puzzle rows (pending in the embedding) hold the step's update."""
        self.model.train()
        recorder = StepRecorder(self.data, self.jd_step.split, self.dist.device)
        embedding = self.model.puzzle_embedding
        micro_metrics: list[dict[str, float]] = []
        for micro in range(self.config.grad_accum_steps):
            rows_before = len(embedding.pending_rows()) if embedding is not None else 0
            micro_batches = self._on_device(batches, slice(micro * self.data.micro_batch, (micro + 1) * self.data.micro_batch))
            with self.jd_step.forward_context(self.model, self.data.micro_batch):
                steps = self.supervision.train_micro_batch(micro, micro_batches, recorder.on_step)
                recorder.end_micro_batch()
                rows = [r for _, r in embedding.pending_rows()[rows_before:]] if embedding is not None else []
                micro_metrics.append(self.jd_step.backward(steps, self.params, rows))
        outcome = self.jd_step.finish(self.optimizers.params)
        # jd/* describe the optimizer step: every micro-batch's and every rank's update (mean; min/max for extremes).
        split = self.jd_step.split
        jd_metrics = reduce_step_diagnostics(micro_metrics, self.dist.world_size, self.dist.device) if not split.is_gd else {}
        return Accumulated(recorder.sums, jd_metrics, outcome.skipped_nonfinite)

    def _update(self, lr_scale: float) -> None:
        if self.config.grad_clip_norm is not None and self.optimizers.params:
            torch.nn.utils.clip_grad_norm_(self.optimizers.params, self.config.grad_clip_norm)
        self.optimizers.step(lr_scale)
        if not self.optimizers.weights_finite():
            raise NonFiniteError(f"the update of step {self.progress.step + 1} made the parameters non-finite (lr={self.config.lr} "
                                 f"too high?); stopped without saving: {self.checkpointer.last_good_phrase()}")
        if self.ema is not None:
            self.ema.update(self.model)

    def _skip(self) -> None:
        """A non-finite step: no update; its puzzle rows dropped and the carries that went non-finite restarted."""
        if self.model.puzzle_embedding is not None:
            self.model.puzzle_embedding.clear_pending()
        self.supervision.drop_nonfinite()

    def _puzzle_row_grads(self) -> list[Tensor]:
        embedding = self.model.puzzle_embedding
        return [rows.grad for _, rows in embedding.pending_rows() if rows.grad is not None] if embedding is not None else []

    def _on_device(self, batches: list[dict[str, Tensor]], rows: slice) -> list[dict[str, Tensor]]:
        return [on_device(batch, rows, self.dist.device) for batch in batches]

    # -------------------------------------------------------------------------- evaluation
    def _evaluate(self) -> dict[str, float]:
        context = self.ema.swapped_into(self.model) if self.ema is not None else nullcontext()
        save_dir = self.run_dir / "eval" / f"step_{self.progress.step:08d}"
        config = self.config
        with context, preserved_rng():  # evaluation never moves the training trajectory
            examples = ExampleProgress(self.data.test, max_batches=config.eval_max_batches, enabled=self.dist.is_main and config.progress_bar)
            results = evaluate(self.loss_head, examples, self.evaluators, self.dist, global_batch_size=config.global_batch_size,
                               max_batches=config.eval_max_batches, save_dir=save_dir if self.dist.is_main else None)
        self.progress.evaluations += 1
        self.progress.eval_pending = 0
        self._evaluated_step = self.progress.step
        if self.logger is not None and results:
            self.logger.log(self.progress.step, results)
            if config.progress_bar:
                shown = {k: round(v, 4) for k, v in results.items() if "accuracy" in k or "pass@" in k}
                print(f"[eval step {self.progress.step}] {shown}", flush=True)
        return results

    # ------------------------------------------------------------------------------ reporting
    def _report(self, metrics: dict[str, float], progress_bar: Any) -> None:
        if self.logger is not None and self.cadence.log_due(self.progress.step):
            self.logger.log(self.progress.step, metrics)
        if progress_bar is not None:
            progress_bar.update(1)
            if "train/accuracy" in metrics:  # only steps where some samples halted have one
                progress_bar.shown_accuracy = metrics["train/accuracy"]
            shown = getattr(progress_bar, "shown_accuracy", float("nan"))
            progress_bar.set_postfix(loss=f"{metrics.get('train/lm_loss', float('nan')):.3f}", acc=f"{shown:.3f}")

    def _progress_bar(self) -> Any:
        if not (self.dist.is_main and self.config.progress_bar):
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.progress.step, desc=self.run_name, dynamic_ncols=True)

    def _close(self, status: str, last_eval: dict[str, float], progress_bar: Any) -> dict[str, Any]:
        """Stop reading ahead, write ``summary.json`` (rank 0), close the logger and release the run directory."""
        if progress_bar is not None:
            progress_bar.close()
        self.data.close()
        latest = self.checkpointer.latest() if self.dist.is_main else None
        summary = {"status": status, "final_step": self.progress.step, "run_dir": str(self.run_dir), "eval": last_eval,
                   "checkpoint": None if latest is None else str(latest), "skipped_nonfinite": self.progress.skipped_nonfinite,
                   "numerics": self.numerics}
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
        return summary
