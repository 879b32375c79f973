"""The projector benchmark's real Gramians: harvested from a real (tiny-budget) IWRM run on the demo task,
then timed with both solvers beside a GD step of the same batch size."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from analysis.harvest_gramians import load_gramians, main
from analysis.projector_benchmark import LATE_FAMILIES, time_projectors


def test_harvest_then_time_the_projectors_on_what_it_harvested(tmp_path: Path) -> None:
    out = tmp_path / "gramians"
    assert main(["--stages", "0,2", "--sizes", "6", "--late-sizes", "10", "--out", str(out)]) == 0
    gramians = load_gramians(out)
    assert sorted(gramians) == ["step0-m6", "step2-m10", "step2-m6"]
    for gramian in gramians.values():
        torch.testing.assert_close(gramian, gramian.T, rtol=1e-5, atol=1e-6 * float(gramian.diagonal().max()))
        assert torch.linalg.eigvalsh(gramian).min() >= -1e-6 * gramian.diagonal().sum()  # PSD up to float32 storage
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"].startswith("python -m analysis.harvest_gramians") and set(manifest["gramians"]) == set(gramians)
    assert manifest["gramians"]["step2-m10"]["m"] == 10 and "torch" in json.dumps(manifest["numerics"])

    rows = time_projectors([6, 10], torch.device("cpu"), repeats=1, harvested=out)
    late = [f"late {family} m={m}" for family in LATE_FAMILIES for m in (6, 10)]
    assert [row["case"] for row in rows] == ["synthetic m=6", "synthetic m=10", *late, "real step0-m6", "real step2-m6", "real step2-m10"]
    for row in rows:
        assert row["pivoting_ms"] > 0 and row["quadprog_ms"] > 0 and row["pivoting_min_cos"] >= -1e-6 and row["gd_step_ms"] > 0
