"""Two gloo processes vs. one process with the same global batch: the distributed rules of the JD step.

* shared-objective splits (and per-instance splits in ``global`` mode) give exactly the 1-process
  gradients, on both ranks;
* per-instance splits in ``local`` mode give the SUM of each rank's own aggregation (what the study did);
* GD all-reduces once in ``finish``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from jd.config import JDConfig
from jd.diagnostics import reduce_step_diagnostics
from jd.step import build_jd_step
from tests.unit.test_jd_step import SEQ, flat_grads, make_batch, make_model, run_steps

WORLD = 2


GLOBAL_B = 4


HALT_MAX_STEPS = 4


SCENARIOS: dict[str, dict[str, Any]] = {
    "gd": {"split": "none"},
    "shared_upgrad": {"split": "lm_loss_vs_q_halt_loss"},
    "pixel_buckets": {"split": "pixelwise_q_halt_in", "n_groups": 2, "seed": 3},
    "supervision_stack": {"split": "stack_supervisions", "max_supervisions": 2},
    "internal_stack_mean": {"split": "stack_internal_losses", "aggregator": "mean", "intermediate_loss_weight": 0.5},
    "iwrm_global": {"split": "iwrm_with_q_halt_in", "distributed": "global"},
    "iwrm_global_autojac": {"split": "iwrm_with_q_halt_out", "distributed": "global", "engine": "autojac"},
    "mixed_global_jacobian_aggregator": {"split": "pixelwise_q_halt_out", "distributed": "global", "aggregator": "config"},
    "iwrm_global_rows_out": {"split": "iwrm_with_q_halt_in", "distributed": "global", "include_puzzle_embedding": False},
    "iwrm_local": {"split": "iwrm_with_q_halt_in", "distributed": "local"},
    "pixel_rank_local": {"split": "pixelwise_q_halt_in", "distributed": "rank_local"},  # the JD study's rule for shared splits
    # Loss-weighting baselines: the scalarizer at the global values, one backward; equal to one process.
    "scalarizer_famo_iwrm": {"split": "iwrm_with_q_halt_in", "scalarizer": "famo"},
    "scalarizer_uw_mixed": {"split": "pixelwise_q_halt_out", "scalarizer": "uw"},
    "scalarizer_geometric_mean_shared": {"split": "lm_loss_vs_q_halt_loss", "scalarizer": "geometric_mean"},
}


LOCAL_SEMANTICS = ("iwrm_local", "pixel_rank_local")


GLOBAL_SEMANTICS = [name for name in SCENARIOS if name not in LOCAL_SEMANTICS]


def _run(config: JDConfig, batch_part: slice, *, world_size: int) -> dict[str, Any]:
    """One micro-batch (the rows ``batch_part`` of the global batch), backward + finish."""
    step = build_jd_step(config, world_size=world_size)
    m = step.split.global_num_objectives(
        batch_size=batch_part.stop - batch_part.start,
        seq_len=SEQ,
        H_cycles=2,
        halt_max_steps=HALT_MAX_STEPS,
        world_size=world_size,
        n_groups=config.n_groups,
    )
    step.build_scalarizer(m, torch.device("cpu"))
    model, table = make_model(cycles=2, seed=0)
    batch = make_batch(GLOBAL_B, seed=11).part(batch_part)
    steps, rows = run_steps(
        model,
        table,
        batch,
        global_batch_size=GLOBAL_B,
        supervision_steps=step.split.supervision_steps(HALT_MAX_STEPS),
        keep_cycles=step.split.needs_cycle_logits,
    )
    params = list(model.parameters())
    metrics = step.backward(steps, params, rows)
    step.finish(params)
    return {"params": flat_grads(params), "rows": [r.grad.clone() if r.grad is not None else None for r in rows], "metrics": metrics}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        half = GLOBAL_B // WORLD
        part = slice(rank * half, (rank + 1) * half)
        results = {name: _run(JDConfig(**kwargs), part, world_size=WORLD) for name, kwargs in SCENARIOS.items()}
        # Two micro-batches' diagnostics on this rank, reduced over micro-batches and ranks.
        records = [
            {"jd/gd_similarity": 0.2 + rank, "jd/update_alignment_min": -rank, "jd/weights_max": 3.0 * rank},
            {"jd/gd_similarity": 0.4 + rank, "jd/update_alignment_min": 0.5, "jd/weights_max": 1.0},
        ]
        results["reduced"] = reduce_step_diagnostics(records, WORLD)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("jd_gloo")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def _rank_rows(full_rows: list[torch.Tensor], rank: int) -> torch.Tensor:
    half = GLOBAL_B // WORLD
    return torch.cat([r[rank * half : (rank + 1) * half].reshape(-1) for r in full_rows])


def _rows(result: dict[str, Any]) -> torch.Tensor:
    return torch.cat([r.reshape(-1) for r in result["rows"]])


@pytest.mark.parametrize("name", GLOBAL_SEMANTICS)
def test_global_semantics_equal_the_one_process_run(two_ranks: list[dict[str, Any]], name: str) -> None:
    single = _run(JDConfig(**SCENARIOS[name]), slice(0, GLOBAL_B), world_size=1)
    ranks = [results[name] for results in two_ranks]
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(result["params"], single["params"], atol=2e-6, rtol=1e-4)
        torch.testing.assert_close(_rows(result), _rank_rows(single["rows"], rank), atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(ranks[0]["params"], ranks[1]["params"], atol=0, rtol=0)  # ranks identical
    for key in ("jd/gd_similarity", "jd/num_objectives"):
        if key in single["metrics"]:
            assert ranks[0]["metrics"][key] == pytest.approx(single["metrics"][key], abs=1e-5)


@pytest.mark.parametrize("name", LOCAL_SEMANTICS)
def test_local_modes_sum_each_rank_s_own_aggregation(two_ranks: list[dict[str, Any]], name: str) -> None:
    """Per-instance splits in ``local`` mode, and every split in ``rank_local`` mode (the JD study's code)."""
    config = JDConfig(**SCENARIOS[name])
    half = GLOBAL_B // WORLD
    per_rank = [_run(config, slice(r * half, (r + 1) * half), world_size=1) for r in range(WORLD)]
    expected = per_rank[0]["params"] + per_rank[1]["params"]
    for rank, results in enumerate(two_ranks):
        result = results[name]
        torch.testing.assert_close(result["params"], expected, atol=2e-6, rtol=1e-4)
        torch.testing.assert_close(_rows(result), _rows(per_rank[rank]), atol=2e-6, rtol=1e-4)
        assert result["metrics"]["jd/num_objectives"] == per_rank[rank]["metrics"]["jd/num_objectives"]  # each rank's own m
    exact = _run(config.model_copy(update={"distributed": "global"}), slice(0, GLOBAL_B), world_size=1)
    assert not torch.allclose(expected, exact["params"], atol=1e-6, rtol=1e-4), "local and global should differ here"


def test_autogram_is_refused_where_the_global_gramian_is_needed() -> None:
    with pytest.raises(ValueError, match="autogram computes only this rank's Gramian"):
        build_jd_step(JDConfig(split="lm_loss_vs_q_halt_loss", engine="autogram"), world_size=2)
    with pytest.raises(ValueError, match="distributed=local"):
        build_jd_step(JDConfig(split="iwrm_with_q_halt_in", engine="autogram", distributed="global"), world_size=2)
    build_jd_step(JDConfig(split="iwrm_with_q_halt_in", engine="autogram", distributed="local"), world_size=2)


def test_diagnostics_describe_the_whole_step_on_every_rank(two_ranks: list[dict[str, Any]]) -> None:
    """jd/* of a step: mean over micro-batches and ranks, min / max of the extremes, the same on every rank."""
    expected = {"jd/gd_similarity": (0.2 + 0.4 + 1.2 + 1.4) / 4, "jd/update_alignment_min": -1.0, "jd/weights_max": 3.0}
    for result in two_ranks:
        assert result["reduced"] == pytest.approx(expected)
