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
(model, optimizers, EMA, progress, data feed, JD step, best-checkpoint record; per rank: RNG streams and ACT
carries), which also decides when a checkpoint is due; :mod:`training.best_checkpoint` keeps the best one;
:class:`~training.cadence.Cadence` decides when to log and evaluate.

Reliability rules (the README's "Run directory, W&B and resuming" section says more): a checkpoint
resumes exactly (evaluation runs with the RNG streams saved and restored); a non-finite step is skipped
and too many in a row stop the run without saving (:mod:`training.nonfinite`); SIGTERM/SIGINT stop at the
next step boundary with a checkpoint (:mod:`training.interrupt`).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from jd.diagnostics import reduce_step_diagnostics
from models.ema import EMA
from models.registry import compile_core
from training.build import (
    best_checkpoint_for,
    check_autogram,
    checkpointer_for,
    evaluation_for,
    jd_step_for,
    loss_head_for,
    model_for,
    optimizers_for,
    supervision_loop_for,
)
from training.cadence import Cadence
from training.config import TrainConfig
from training.console import ProgressBar
from training.data_feed import DataFeed
from training.distributed import DistInfo, ElasticInfo, elastic_info, stop_requested
from training.init_weights import resolve_init_from
from training.interrupt import StopSignals, stopped_at_once_status
from training.logger import MetricsWriteError, RunLogger, check_wandb_config
from training.nonfinite import NonFiniteError, NonFiniteGuard
from training.numerics import run_numerics
from training.run_dir import RunDirError, claim_run, prepare_run_dir, run_summary, write_summary
from training.scalarizer_schedule import ScalarizerSchedule
from training.state import Progress, capture_rng, seed_everything
from training.train_metrics import Accumulated, StepRecorder, train_metrics

__all__ = ["NonFiniteError", "Trainer"]


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
        estimated = self.data.estimated_steps(self.jd_step.split.batches_per_step(config.arch.halt_max_steps))
        self.total_steps = min(estimated, config.max_steps) if config.max_steps else estimated
        self.model, init_notes = model_for(config, dist_info, self.data, init_path)
        self.loss_head = loss_head_for(config, self.model)
        self.supervision = supervision_loop_for(config, self.loss_head, self.jd_step, self.data, dist_info)
        if self.jd_step.engine == "autogram":
            check_autogram(config, self.supervision, self.data.train.metadata.seq_len, dist_info.device)
        self.jd_step.attach(self.model)  # only jd.engine=autogram hooks the modules
        self.optimizers = optimizers_for(config, self.model, dist_info, self.jd_step)
        self.params = self.optimizers.jacobian_params  # what the backward differentiates (frozen weights included)
        self.ema = EMA(self.model, config.ema_rate) if config.ema else None
        if config.compile_enabled(dist_info.device.type):
            compile_core(self.model, repeated_backward=config.jd.split != "none", regional=config.regional_compile)
        self.evaluation = evaluation_for(config, self.loss_head, self.data, dist_info, self.ema)
        self.scalarizer_schedule = ScalarizerSchedule(self.jd_step.scalarizer, self.data.train, self.data.epochs_per_iter)
        self.cadence = Cadence(config, self.total_steps, is_main=dist_info.is_main)
        self.guard = NonFiniteGuard(config.max_nonfinite_steps, dist_info.world_size)
        self.best = best_checkpoint_for(config, dist_info)
        self.checkpointer = checkpointer_for(
            config, dist_info, self.model, self.optimizers, self.ema, self.progress, self.data, self.jd_step, self.supervision, self.best
        )
        self._open_run(init_notes)

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
        self.numerics = run_numerics(dist_info.device, self.model.forward_dtype, config.compile_record(dist_info.device.type), dist_info.world_size)
        self.run_dir, self.run_name, self.project_name, new_lock = prepare_run_dir(config, dist_info, plan, self.numerics)
        self._lock = self._lock or new_lock
        self.checkpointer.attach(self.run_dir)
        if plan.checkpoint is not None:
            self.best.after_restore(same_run=plan.continues_run)
        self.logger: RunLogger | None = None
        if not dist_info.is_main:
            return
        for note in ([plan.note] if plan.note else []) + [f"init_from: {note}" for note in init_notes]:
            print(note if note.startswith("init_from") else f"note: {note}", flush=True)
        if plan.checkpoint is not None:
            print(f"Resuming from {plan.checkpoint} (step {self.progress.step}) in {self.run_dir}", flush=True)
        logged_config = config.model_dump(mode="json") | {"numerics": self.numerics}
        redo_eval = bool(self.progress.eval_pending)
        self.logger = RunLogger(
            self.run_dir, logged_config, config.wandb, self.run_name, self.project_name, resume_step=resume_step, redo_eval=redo_eval
        )

    # ------------------------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        """Train until ``epochs`` or ``max_steps``; evaluate and checkpoint on the way. Returns the summary.

        Raises :class:`NonFiniteError` (after writing ``summary.json``) when training diverges.
        """
        progress_bar = ProgressBar(
            enabled=self.dist.is_main and self.config.progress_bar, total=self.total_steps, initial=self.progress.step, desc=self.run_name
        )
        outcome: dict[str, Any] = {"status": "failed", "eval": {}}
        try:
            with StopSignals() as signals:
                outcome["status"] = "finished"
                self._train(signals, progress_bar, outcome)
        except NonFiniteError:
            outcome["status"] = "stopped: non-finite"
            raise
        except MetricsWriteError as error:
            outcome["status"] = "stopped: metrics.jsonl could not be written"
            raise RunDirError(f"{error.strerror}; training stopped at step {self.progress.step}: {self.checkpointer.kept_phrase()}") from None
        except BaseException as error:
            if outcome["status"] == "finished":
                outcome["status"] = stopped_at_once_status(error) or f"failed: {type(error).__name__}"
            raise
        finally:
            summary = self._close(outcome["status"], outcome["eval"], progress_bar)
        if self.dist.world_size > 1:
            dist.barrier()  # leave together: a rank tearing down its process group early can abort the others
        return summary

    def _train(self, signals: StopSignals, progress_bar: ProgressBar, outcome: dict[str, Any]) -> None:
        """Steps until the end, a stop signal or divergence; ``outcome`` keeps the status and the latest evaluation."""
        outcome["eval"] = self.cadence.at_the_start(self.progress, self.plan.checkpoint is not None, self.run_dir, self._evaluate)
        while not self.cadence.finished(self.progress):
            iteration_before = self.progress.iteration
            metrics = self.step()
            if metrics is None:
                break
            if self.logger is not None and self.cadence.log_due(self.progress.step):
                self.logger.log(self.progress.step, metrics)
            progress_bar.update(metrics)
            if self.guard.too_many(self.progress):
                raise NonFiniteError(self.guard.message(self.progress, self.checkpointer.last_good_phrase()))
            outcome["eval"] = self.cadence.after_step(self.progress, iteration_before, self.checkpointer, self._evaluate) or outcome["eval"]
            signal_name = stop_requested(signals, self.dist.world_size, self.dist.device)
            if signal_name:
                outcome["status"] = f"interrupted by {signal_name}"
                self._save_on_stop(signal_name)
                return
        outcome["eval"] = self.cadence.at_the_end(self.progress, self.checkpointer, self._evaluate) or outcome["eval"]

    def _save_on_stop(self, signal_name: str) -> None:
        path = self.checkpointer.save(self.progress)
        if self.dist.is_main:
            print(f"\nStopped by {signal_name} at step {self.progress.step}; checkpoint {path}", flush=True)

    # ------------------------------------------------------------------------------------ step
    def step(self) -> dict[str, float] | None:
        """Run one optimizer step (or skip it if anything is non-finite) and advance the progress.

        Returns the step's ``train/...`` metrics, or ``None`` when the data stream is exhausted.
        Raises :class:`NonFiniteError` when an update leaves the parameters non-finite.
        """
        before = (self.progress.iteration, self.progress.batch_in_iteration)
        batches = self.data.next_batches(self.supervision.batches_per_step)
        if batches is None:
            return None
        started = time.perf_counter()
        scalarizer = self.jd_step.scalarizer
        updates_after = scalarizer is not None and scalarizer.updates_after_step  # FAMO (grad_accum_steps=1)
        famo = (self.supervision.carries[0], capture_rng()) if updates_after else None
        lr_scale = self.cadence.lr_scale(self.progress.step)
        result = self.accumulate_gradients(batches)
        finite, sums, grad_norm = self.guard.check(
            result.sums, self.optimizers.params, jd_skipped=result.jd_skipped, embedding=self.model.puzzle_embedding
        )
        if finite:
            self._update(lr_scale)
            if famo is not None:
                self.jd_step.recomputed(self.supervision.recompute(self.data.on_device(batches, slice(None)), *famo))
        else:
            self._skip()
        self.guard.record(self.progress, finite)
        self.optimizers.zero_grad()
        self.progress.step += 1
        self.scalarizer_schedule.after_step(before, (self.progress.iteration, self.progress.batch_in_iteration))
        extra = {**result.jd_metrics, **self.data.sampling_stats, "train/data_wait_s": self.data.take_wait()}
        return train_metrics(sums, self.config.lr * lr_scale, float(grad_norm), self.progress.skipped_nonfinite, time.perf_counter() - started, extra)

    def accumulate_gradients(self, batches: list[dict[str, Tensor]]) -> Accumulated:
        """The forwards and backward of one optimizer step, without the update: ``.grad`` of the weights and
        of the puzzle rows (pending in the embedding) hold the step's update."""
        self.model.train()
        recorder = StepRecorder(self.data, self.jd_step.split, self.dist.device)
        embedding = self.model.puzzle_embedding
        micro_metrics: list[dict[str, float]] = []
        for micro in range(self.config.grad_accum_steps):
            rows_before = len(embedding.pending_rows()) if embedding is not None else 0
            micro_batches = self.data.on_device(batches, slice(micro * self.data.micro_batch, (micro + 1) * self.data.micro_batch))
            with self.jd_step.forward_context(self.model, self.data.micro_batch) as weights:  # per-sample weights, or None
                steps = self.supervision.train_micro_batch(micro, micro_batches, recorder.on_step, weights)
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
            raise NonFiniteError(
                f"the update of step {self.progress.step + 1} made the parameters non-finite (lr={self.config.lr} "
                f"too high?); stopped without saving: {self.checkpointer.last_good_phrase()}"
            )
        if self.ema is not None:
            self.ema.update(self.model)

    def _skip(self) -> None:
        """A non-finite step: no update; its puzzle rows dropped and the carries that went non-finite restarted."""
        if self.model.puzzle_embedding is not None:
            self.model.puzzle_embedding.clear_pending()
        self.supervision.drop_nonfinite()

    # -------------------------------------------------------------------------- evaluation
    def _evaluate(self) -> dict[str, float]:
        results = self.evaluation(self.run_dir / "eval" / f"step_{self.progress.step:08d}", index=self.progress.evaluations)
        self.progress.evaluations += 1
        self.progress.eval_pending = 0
        if self.logger is not None and results:
            self.logger.log_evaluation(self.progress.step, results, show=self.config.progress_bar)
        self.best.after_evaluation(results, self.progress, self.checkpointer)
        return results

    # ------------------------------------------------------------------------------ reporting
    def _close(self, status: str, last_eval: dict[str, float], progress_bar: ProgressBar) -> dict[str, Any]:
        """Stop reading ahead, write ``summary.json`` (rank 0), close the logger and release the run directory."""
        progress_bar.close()
        self.data.close()
        latest = self.checkpointer.latest() if self.dist.is_main else None
        summary = run_summary(status, self.progress, self.run_dir, last_eval, latest, self.numerics, self.best.summary(self.run_dir))
        if self.dist.is_main:
            try:
                write_summary(self.run_dir, summary)
            finally:
                if self.logger is not None:
                    self.logger.close()
                if self._lock is not None:
                    self._lock.release()
        return summary
