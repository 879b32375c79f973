"""Shared by the study_fixture tests (tests/*/test_study_fixture.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dataset.common import DatasetMetadata, SplitArrays, write_dataset
from tests.conftest import REPO, compose
from training.distributed import DistInfo
from training.trainer import Trainer

FIXTURE = REPO / "tests" / "fixtures" / "jd_study"


RECORD = torch.load(FIXTURE / "cases.pt", weights_only=True)


CASES: dict[str, dict[str, Any]] = RECORD["cases"]


ARCH: dict[str, Any] = json.loads(RECORD["arch"])


CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def study_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset of the fixture's sizes (its content is not read: the tests feed the fixture's batches)."""
    generator = np.random.default_rng(0)
    arrays = SplitArrays(
        inputs=generator.integers(1, 6, (8, 16)),
        labels=generator.integers(1, 6, (8, 16)),
        puzzle_identifiers=np.array([1, 2, 3, 4]),
        puzzle_indices=np.array([0, 2, 4, 6, 8]),
        group_indices=np.array([0, 4]),
    )
    metadata = DatasetMetadata(kind="fixture", seq_len=16, vocab_size=6, num_puzzle_identifiers=5, grid_shape=(4, 4))
    path = tmp_path_factory.mktemp("study") / "data"
    return write_dataset(path, metadata, {"train": arrays, "test": arrays}, identifiers=["<blank>", "a", "b", "c", "d"])


def study_trainer(settings: dict[str, Any], data: Path, runs: Path, *extra: str) -> Trainer:
    """The real trainer, ``compat=jd_study``, with the fixture's architecture, weights and case settings."""
    split = "none" if settings["split"] == "sum" else settings["split"]
    arch_keys = (
        "hidden_size",
        "num_heads",
        "expansion",
        "H_cycles",
        "L_cycles",
        "L_layers",
        "halt_max_steps",
        "puzzle_emb_ndim",
        "puzzle_emb_len",
        "pos_encodings",
    )
    checkpoint = FIXTURE / (settings["checkpoint"] or "step_0")
    overrides = [
        "compat=jd_study",
        f"jd.split={split}",
        *(f"arch.{key}={ARCH[key]}" for key in arch_keys),
        "arch.forward_dtype=float32",
        "arch.dropout=0.0",
        f"init_from={checkpoint}",
        f"data_paths=[{data}]",
        f"runs_root={runs}",
        "global_batch_size=4",
        "lr_warmup_steps=0",
        "device=cpu",
        "progress_bar=false",
        "wandb.mode=disabled",
        "eval_steps=[]",
        f"jd.differential_loss={settings['differential_loss']}",
        f"freeze_weights={settings['freeze_weights']}",
        f"jd.carry_perturbation_rate={settings['carry_perturbation_rate']}",
    ]
    if settings["n_groups"]:
        overrides += [f"jd.n_groups={settings['n_groups']}", f"jd.seed={settings['seed']}"]  # the study's permutation stream
    return Trainer(compose(overrides + list(extra)), CPU)


def run_like_the_fixture(trainer: Trainer, case: dict[str, Any], settings: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], int]:
    """Feed the case's batches as the fixture did (seeded per call, no update between calls); return the
    recorded call's gradients (toolkit names; ``puzzle_rows``: the rows' gradient, summed over their leaves),
    its objectives and how many puzzle-row leaves it made."""
    embedding = trainer.model.puzzle_embedding
    assert embedding is not None
    objectives: list[torch.Tensor] = []
    backward = trainer.jd_step.backward

    def recording(steps: Any, params: Any, rows: Any) -> dict[str, float]:
        objectives.append(trainer.jd_step.split.objectives(steps).detach().clone())
        return backward(steps, params, rows)

    trainer.jd_step.backward = recording  # type: ignore[method-assign]  # a recording wrapper around the real method
    for call, batch in enumerate(case["batches"]):
        for parameter in trainer.model.parameters():
            parameter.grad = None
        embedding.clear_pending()
        objectives.clear()
        torch.manual_seed(settings["seed"] + call)
        trainer.accumulate_gradients([{key: value.long() for key, value in batch.items()}])
    grads = {name: p.grad for name, p in trainer.model.named_parameters() if p.grad is not None}
    rows = embedding.pending_rows()
    grads["puzzle_rows"] = sum((leaf.grad for _, leaf in rows if leaf.grad is not None), torch.zeros_like(rows[0][1]))
    return grads, objectives, len(rows)


def _study_page_section(start: str, stop: str | None = None) -> str:
    """The text of docs/study.md from ``start`` to ``stop`` (the page's end when None)."""
    text = (REPO / "docs" / "study.md").read_text(encoding="utf-8")
    begin = text.index(start)
    return text[begin:] if stop is None else text[begin : text.index(stop, begin + len(start))]


def _rerun_commands() -> list[str]:
    section = _study_page_section("# Re-running the JD study", "## Differences from the JD study's code")
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [line.strip() for line in block.splitlines() if line.strip().startswith("python pretrain.py ") and " -m " not in line]
