"""Building a run's components from its validated config, each failure a :class:`ConfigError` naming the
setting, raised before the first step (the trainer only wires what these return)."""

from __future__ import annotations

from pathlib import Path

import torch

from dataset.common import DatasetError
from evaluators.base import Evaluator
from jd.autogram_engine import check_autogram_fits
from jd.splits import validate_split
from jd.step import JDStep, build_jd_step
from models.ema import EMA
from models.losses import ACTLossHead
from models.recursive_reasoning.act import ACTModel
from models.registry import build_model
from training.best_checkpoint import BestCheckpoint, infer_mode
from training.checkpointer import NO_STATE, Checkpointer, ModelWeights, RngStreams
from training.config import ConfigError, TrainConfig
from training.data_feed import DataFeed
from training.distributed import DistInfo, broadcast_module_
from training.evaluation import RunEvaluation, build_evaluators, evaluation_metric_names
from training.init_weights import init_weights_from
from training.optimizers import RunOptimizers
from training.state import Progress, preserved_rng
from training.supervision import SupervisionLoop


def jd_step_for(config: TrainConfig, dist_info: DistInfo, data: DataFeed) -> JDStep:
    """The JD (or GD) backward step, checked against the architecture and sized for the data; prints its notes."""
    meta, arch = data.train.metadata, config.arch
    try:
        validate_split(
            config.jd,
            halt_max_steps=arch.halt_max_steps,
            H_cycles=arch.H_cycles,
            no_ACT_continue=arch.no_ACT_continue,
            batch_size=data.micro_batch,
            seq_len=meta.seq_len,
            no_act=arch.no_act,
            puzzle_rows_only=config.freeze_weights and config.jd.frozen_weights == "left_out",
        )
        if config.compile_enabled(dist_info.device.type):
            config.jd.check_compilable()
        step = build_jd_step(config.jd, world_size=dist_info.world_size, halt_max_steps=arch.halt_max_steps)
        notes = step.prepare(
            batch_size=data.micro_batch,
            seq_len=meta.seq_len,
            H_cycles=arch.H_cycles,
            halt_max_steps=arch.halt_max_steps,
            grad_accum_steps=config.grad_accum_steps,
            device=dist_info.device,
        )
    except (ValueError, ImportError) as error:  # ImportError: an aggregator's optional solver is missing
        raise ConfigError(str(error)) from None
    for note in notes if dist_info.is_main else []:
        print(f"note: {note}", flush=True)
    return step


def model_for(config: TrainConfig, dist_info: DistInfo, data: DataFeed, init_path: Path | None) -> tuple[ACTModel, list[str]]:
    """The model for the data's sizes, with ``init_from``'s weights when given (every rank reads them, so a bad
    file fails everywhere at once), then rank 0's weights on every rank. Returns it and the loading notes."""
    meta = data.train.metadata
    try:
        model = build_model(
            config.arch, seq_len=meta.seq_len, vocab_size=meta.vocab_size, num_puzzle_identifiers=meta.num_puzzle_identifiers, device=dist_info.device
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None
    notes = init_weights_from(model, init_path, config.model_dump(mode="json")) if init_path is not None else []
    broadcast_module_(model, dist_info.world_size)
    return model, notes


def loss_head_for(config: TrainConfig, model: ACTModel) -> ACTLossHead:
    return ACTLossHead(
        model,
        config.arch.loss_type,
        differential_loss=config.jd.differential_loss,
        differential_across_samples=config.jd.differential_first_step == "replaced_sample",
    )


def check_autogram(config: TrainConfig, loop: SupervisionLoop, seq_len: int, device: torch.device) -> None:
    """``jd.engine=autogram`` cannot differentiate a module used twice per backward (the TRM's recursion,
    supervision stacks): find out on one sample, with the RNG left as it was, before training starts."""
    sample = {
        "inputs": torch.zeros(1, seq_len, dtype=torch.long, device=device),
        "labels": torch.zeros(1, seq_len, dtype=torch.long, device=device),
        "puzzle_identifiers": torch.zeros(1, dtype=torch.long, device=device),
    }
    model = loop.loss_head.model
    try:
        with preserved_rng():
            check_autogram_fits([model], lambda: loop.probe(sample))
    except ValueError as error:
        raise ConfigError(f"arch={config.arch.name} with jd.split={config.jd.split}: {error}") from None
    finally:
        if model.puzzle_embedding is not None:
            model.puzzle_embedding.clear_pending()


def optimizers_for(config: TrainConfig, model: ACTModel, dist_info: DistInfo, jd_step: JDStep) -> RunOptimizers:
    """Adam-atan2 for the weights (and a scalarizer's parameters), sign-SGD for the puzzle embedding."""
    scalarizer = jd_step.scalarizer
    try:
        return RunOptimizers(
            model,
            lr=config.lr,
            puzzle_emb_lr=config.puzzle_emb_lr,
            betas=(config.beta1, config.beta2),
            weight_decay=config.weight_decay,
            puzzle_emb_weight_decay=config.puzzle_emb_weight_decay,
            world_size=dist_info.world_size,
            freeze_weights=config.freeze_weights,
            frozen_in_jacobian=config.jd.frozen_weights == "in_jacobian" and not jd_step.split.is_gd,
            extra_params=list(scalarizer.parameters()) if scalarizer is not None else None,
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None


def evaluation_for(config: TrainConfig, loss_head: ACTLossHead, data: DataFeed, dist_info: DistInfo, ema: EMA | None) -> RunEvaluation:
    """The run's evaluation on the test split, with the configured evaluators (and the EMA weights when kept)."""
    return RunEvaluation(
        loss_head,
        data.test,
        evaluators_for(config),
        dist_info,
        global_batch_size=config.global_batch_size,
        max_batches=config.eval_max_batches,
        progress_bar=config.progress_bar,
        ema=ema,
        also_raw=config.checkpoint_best is not False and config.checkpoint_best_raw,
        depths=config.eval_depths,
        depths_every=config.eval_depths_every,
    )


def best_checkpoint_for(config: TrainConfig, dist_info: DistInfo) -> BestCheckpoint:
    """The best-checkpoint tracker; its metric must be one the run's evaluation logs (checked before any compute)."""
    if config.checkpoint_best is False:
        return BestCheckpoint(config.objective, "max", (), dist_info)
    metric = config.objective if config.checkpoint_best is True else config.checkpoint_best
    accepted = evaluation_metric_names(config.evaluators, config.eval_depths if config.eval_depths_every == 1 else ())
    if metric not in accepted:
        setting = f"checkpoint_best (the objective, {metric})" if config.checkpoint_best is True else f"checkpoint_best={metric}"
        raise ConfigError(f"{setting}: not a metric this run's evaluation logs; accepted: {accepted}, or checkpoint_best=false")
    mode = infer_mode(metric) if config.checkpoint_best_mode == "auto" else config.checkpoint_best_mode
    kinds = ("weights",) if not config.ema else ("ema", "raw") if config.checkpoint_best_raw else ("ema",)
    return BestCheckpoint(metric, mode, kinds, dist_info)


def evaluators_for(config: TrainConfig) -> list[Evaluator]:
    try:
        return build_evaluators(config.evaluators, config.eval_paths)
    except DatasetError:
        raise
    except ValueError as error:
        raise ConfigError(f"evaluators: {error}") from None


def supervision_loop_for(config: TrainConfig, loss_head: ACTLossHead, jd_step: JDStep, data: DataFeed, dist_info: DistInfo) -> SupervisionLoop:
    """The supervision loop of the split, with one carry per micro-batch."""
    meta, arch = data.train.metadata, config.arch
    return SupervisionLoop(
        loss_head,
        jd_step.split,
        config.jd,
        global_batch_size=config.global_batch_size,
        grad_accum_steps=config.grad_accum_steps,
        halt_max_steps=arch.halt_max_steps,
        agree_on_halting=jd_step.exact_global,
        carry_shape=(data.micro_batch, meta.seq_len, meta.seq_len + loss_head.model.puzzle_emb_len, arch.hidden_size),
        device=dist_info.device,
        is_main=dist_info.is_main,
    )


def checkpointer_for(
    config: TrainConfig,
    dist_info: DistInfo,
    model: ACTModel,
    optimizers: RunOptimizers,
    ema: EMA | None,
    progress: Progress,
    data: DataFeed,
    jd_step: JDStep,
    supervision: SupervisionLoop,
    best: BestCheckpoint,
) -> Checkpointer:
    """The checkpointer, with every component's state registered (restored in this order): a new capability that
    owns state adds one ``register`` call here."""
    meta = data.train.metadata
    checkpointer = Checkpointer(
        dist_info,
        keep_last=config.keep_last,
        interval=config.checkpoint_interval,
        every_eval=config.checkpoint_every_eval,
        static={
            "config": config.model_dump(mode="json"),
            "data": {"seq_len": meta.seq_len, "vocab_size": meta.vocab_size, "num_puzzle_identifiers": meta.num_puzzle_identifiers},
        },
    )
    checkpointer.register("model", ModelWeights(model), "the model's weights")
    checkpointer.register("optimizer", optimizers, "the optimizer state", spread=True)
    checkpointer.register(
        "ema",
        ema or NO_STATE,
        "the EMA weights",  # a run without EMA: start it from the loaded weights
        on_absent=(lambda: ema.reset(model)) if ema is not None else NO_STATE.load_state_dict,
    )
    checkpointer.register("progress", progress, "the progress record")
    checkpointer.register("sampler", data, "the data position and hard-example counts", on_absent=data.check_position)
    checkpointer.register("jd", jd_step, "the JD step's state", on_absent=NO_STATE.load_state_dict)
    checkpointer.register("best", best, "the best-checkpoint record", on_absent=best.reset)
    checkpointer.register_rank("rng", RngStreams(), "the RNG streams")
    checkpointer.register_rank("carries", supervision, "the ACT carries")
    return checkpointer
