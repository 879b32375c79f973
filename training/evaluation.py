"""Evaluation: run every test batch through all ACT steps and feed the evaluators."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from dataset.puzzle_dataset import PuzzleDataset
from evaluators.base import Evaluator
from evaluators.depth import DepthEvaluation
from evaluators.exact import ExactMatchEvaluator
from evaluators.puzzle_ids import TRUE_IDENTIFIERS
from models.ema import EMA
from models.losses import ACTLossHead
from models.recursive_reasoning.act import ACTModel
from training.config import EvaluatorConfig
from training.distributed import DistInfo
from training.state import preserved_rng

EVAL_SUMS = ("count", "accuracy", "exact_accuracy", "q_halt_accuracy", "steps", "lm_loss", "q_halt_loss")


def evaluation_metric_names(configs: list[EvaluatorConfig], depths: Sequence[int] = ()) -> list[str]:
    """Every metric each of a run's evaluations logs with these evaluators (``eval/...``, ``ARC/pass@K``) and
    step budgets (``eval/exact_accuracy@K``, ``.../q``).

    Example:
        >>> evaluation_metric_names([EvaluatorConfig(name="arc", pass_ks=[1, 2])])[-2:]
        ['ARC/pass@1', 'ARC/pass@2']
    """
    names = [f"eval/{name}" for name in EVAL_SUMS if name != "count"] + ["eval/exact_accuracy_ci_low", "eval/exact_accuracy_ci_high"]
    for config in configs:
        if config.name == "arc":
            names += [f"ARC/pass@{k}" for k in config.pass_ks]
    for depth in depths:
        names += [f"eval/exact_accuracy@{depth}", f"eval/exact_accuracy@{depth}/q", f"eval/steps@{depth}/q"]
    return names


def evaluate_depths(
    model: ACTModel,
    data: PuzzleDataset | ExampleProgress,
    depths: Sequence[int],
    rules: Sequence[str],
    make_evaluators: Callable[[], list[Evaluator]],
    dist_info: DistInfo,
    *,
    max_batches: int | None,
) -> dict[str, dict[int, dict[str, float]]]:
    """:class:`evaluators.depth.DepthEvaluation` over the test split (``max_batches`` of it); the results on rank 0."""
    depth = DepthEvaluation(model, depths, rules, make_evaluators)
    for index, batch in enumerate(data.test_batches()):
        if max_batches is not None and index >= max_batches:
            break
        depth.update_batch({key: value.to(dist_info.device) for key, value in batch.items()})
    return depth.result(dist_info.rank, dist_info.world_size)


def depth_metrics(model: ACTModel, data: PuzzleDataset, depths: Sequence[int], dist_info: DistInfo, max_batches: int | None) -> dict[str, float]:
    """Exact accuracy at each step budget (``eval/exact_accuracy@K``) and, for a model with a Q-head, when it
    halts samples itself (``eval/exact_accuracy@K/q`` with its mean steps ``eval/steps@K/q``)."""
    rules = ("max",) if model.config.no_act else ("max", "q")
    results = evaluate_depths(model, data, depths, rules, lambda: [ExactMatchEvaluator("eval")], dist_info, max_batches=max_batches)
    out: dict[str, float] = {}
    for rule, by_depth in results.items():
        suffix = "" if rule == "max" else f"/{rule}"
        for budget, row in by_depth.items():
            out[f"eval/exact_accuracy@{budget}{suffix}"] = row["eval/exact_accuracy"]
            if rule != "max":
                out[f"eval/steps@{budget}{suffix}"] = row["mean_steps"]
    return out


RAW_PREFIX = "raw/"
"""Prefix of the live (non-EMA) weights' metrics when a run with ``ema=true`` evaluates both."""


def build_evaluators(configs: list[EvaluatorConfig], eval_paths: list[str]) -> list[Evaluator]:
    """Evaluators from the project's registry (never from import strings in config)."""
    evaluators: list[Evaluator] = []
    for config in configs:
        if config.name == "exact":
            from evaluators.exact import ExactMatchEvaluator

            evaluators.append(ExactMatchEvaluator(name="eval"))
        elif config.name == "arc":
            from evaluators.arc import ARCEvaluator

            evaluators.append(ARCEvaluator(eval_paths[0], pass_ks=tuple(config.pass_ks), submission_k=config.submission_k))
    return evaluators


class ExampleProgress:
    """A test split whose batches pass through a tqdm bar that counts examples (of all ranks), so a
    long evaluation shows where it is even when it runs one batch; shown on the main rank only."""

    def __init__(self, data: PuzzleDataset, *, max_batches: int | None, enabled: bool, desc: str = "evaluating") -> None:
        self.data = data
        self.total = data.total_examples if max_batches is None else min(data.total_examples, max_batches * data.global_batch_size)
        self.enabled = enabled
        self.desc = desc

    def test_batches(self) -> Iterator[dict[str, Tensor]]:
        from tqdm import tqdm

        with tqdm(total=self.total, desc=self.desc, unit="example", disable=not self.enabled, leave=False, dynamic_ncols=True) as bar:
            for batch in self.data.test_batches():
                yield batch
                bar.update(min(self.data.global_batch_size, self.total - bar.n))


@torch.no_grad()
def evaluate(
    loss_head: ACTLossHead,
    data: PuzzleDataset | ExampleProgress,
    evaluators: list[Evaluator],
    dist_info: DistInfo,
    *,
    global_batch_size: int,
    max_batches: int | None = None,
    save_dir: Path | None = None,
) -> dict[str, float]:
    """Metrics on rank 0 (``eval/...`` from the loss head plus each evaluator's keys); ``{}`` elsewhere."""
    model = loss_head.model
    was_training = model.training
    model.eval()
    for evaluator in evaluators:
        evaluator.begin_eval()
    sums = torch.zeros(len(EVAL_SUMS), device=dist_info.device)
    for index, batch in enumerate(data.test_batches()):
        if max_batches is not None and index >= max_batches:
            break
        batch = {key: value.to(dist_info.device) for key, value in batch.items()}
        scored = batch  # evaluators see the true identifiers even when the model is given others (evaluators.puzzle_ids)
        if TRUE_IDENTIFIERS in batch:
            true_identifiers = batch.pop(TRUE_IDENTIFIERS)
            scored = {**batch, "puzzle_identifiers": true_identifiers}
        carry = loss_head.initial_carry(batch)
        for _ in range(model.config.halt_max_steps):
            carry, _, metrics, outputs, all_halted = loss_head(carry, batch, global_batch_size=global_batch_size)
            if bool(all_halted):
                break
        sums += torch.stack([metrics[name].float() for name in EVAL_SUMS])
        for evaluator in evaluators:
            evaluator.update_batch(scored, {key: outputs[key] for key in ("preds", "q_halt_logits", "logits")})
    if dist_info.world_size > 1:
        dist.all_reduce(sums)
    results: dict[str, float] = {}
    values = dict(zip(EVAL_SUMS, sums.tolist()))
    count = max(values.pop("count"), 1.0)
    for name, value in values.items():
        results[f"eval/{name}"] = value / count
    results["eval/count"] = count
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
    for evaluator in evaluators:
        extra = evaluator.result(save_dir, dist_info.rank, dist_info.world_size)
        if extra:
            results.update(extra)
    if was_training:
        model.train()
    return results if dist_info.is_main else {}


class RunEvaluation:
    """A training run's evaluation: the test split through every ACT step, with the EMA weights when kept,
    without moving any RNG stream (so the training trajectory is the same with or without it).

    Args:
        loss_head: the model's loss head (its model gets the EMA weights for the evaluation).
        data: the test split.
        evaluators: what scores the predictions.
        dist_info: this rank's place (every rank evaluates its share; rank 0 writes).
        global_batch_size, max_batches, progress_bar: ``global_batch_size``, ``eval_max_batches``, ``progress_bar``.
        ema: the weights' moving average (``None``: the live weights).
        also_raw: with ``ema``, evaluate the live weights too; their metrics carry the prefix ``raw/``.
        depths, depths_every: step budgets scored at every ``depths_every``-th evaluation (:func:`depth_metrics`).
    """

    def __init__(
        self,
        loss_head: ACTLossHead,
        data: PuzzleDataset,
        evaluators: list[Evaluator],
        dist_info: DistInfo,
        *,
        global_batch_size: int,
        max_batches: int | None,
        progress_bar: bool,
        ema: EMA | None,
        also_raw: bool = False,
        depths: Sequence[int] = (),
        depths_every: int = 1,
    ) -> None:
        self.loss_head, self.data, self.evaluators, self.dist = loss_head, data, evaluators, dist_info
        self.global_batch_size, self.max_batches, self.progress_bar, self.ema = global_batch_size, max_batches, progress_bar, ema
        self.also_raw = also_raw and ema is not None
        self.depths, self.depths_every = sorted(depths), depths_every

    def __call__(self, save_dir: Path, index: int = 0) -> dict[str, float]:
        """The ``index``-th evaluation's metrics (outputs saved under ``save_dir`` on rank 0; the live weights' under ``save_dir/raw``)."""
        model = self.loss_head.model
        context = self.ema.swapped_into(model) if self.ema is not None else contextlib.nullcontext()
        with context:
            results = self._evaluate(save_dir)
            if self.depths and index % self.depths_every == 0:
                with preserved_rng():
                    results.update(depth_metrics(model, self.data, self.depths, self.dist, self.max_batches))
        if self.also_raw:
            raw = self._evaluate(save_dir / "raw", "evaluating (live weights)")
            results.update({RAW_PREFIX + key: value for key, value in raw.items()})
        return results

    def _evaluate(self, save_dir: Path, desc: str = "evaluating") -> dict[str, float]:
        with preserved_rng():  # evaluation never moves the training trajectory
            examples = ExampleProgress(self.data, max_batches=self.max_batches, enabled=self.dist.is_main and self.progress_bar, desc=desc)
            return evaluate(
                self.loss_head,
                examples,
                self.evaluators,
                self.dist,
                global_batch_size=self.global_batch_size,
                max_batches=self.max_batches,
                save_dir=save_dir if self.dist.is_main else None,
            )
