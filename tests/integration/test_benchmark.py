"""The benchmark runs end to end at the tiny preset and writes what it promises (no timing asserted).

The integration tests; the others are in
tests/unit/test_benchmark.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis.benchmark import main


def test_tiny_benchmark_writes_every_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--preset", "tiny", "--variants", "gd,iwrm", "--engines", "auto,gramian", "--batch-size", "4", "--steps", "1", "--warmup", "1"]
    assert main([*argv, "--projector-sizes", "6", "--ab-repetitions", "2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "benchmark-tiny-cpu-eager.json").read_text())
    assert report["header"]["isolated"] is True and report["header"]["batch_size"] == 4
    rows = {row["variant"]: row for row in report["results"]}
    assert set(rows) == {"gd", "iwrm[auto]", "iwrm[gramian]"}
    assert rows["iwrm[auto]"]["engine"] == "per_sample" and rows["iwrm[gramian]"]["engine"] == "gramian"
    for row in rows.values():
        assert row["error"] is None
        assert row["median_ms"] > 0 and row["peak_mem_mib"] is not None and row["ratio_to_gd"] is not None
    assert rows["iwrm[auto]"]["objectives"] == 4  # one objective per sample
    # Both engines compute the same update, so the same GD similarity.
    assert rows["iwrm[auto]"]["gd_similarity"] == pytest.approx(rows["iwrm[gramian]"]["gd_similarity"], abs=1e-4)
    assert report["projectors"][0]["m"] == 6 and report["projectors"][0]["pivoting_ms"] > 0
    markdown = (tmp_path / "benchmark-tiny-cpu-eager.md").read_text()
    assert "| iwrm[auto] | iwrm_with_q_halt_in | per_sample | 4 |" in markdown
    assert all(row["min_ms"] <= row["median_ms"] for row in rows.values())
    # Interleaved A/B: one ratio per repetition for every JD variant, none for GD itself.
    assert rows["gd"]["ab_ratios"] == [] and all(
        len(rows[v]["ab_ratios"]) == 2 and min(rows[v]["ab_ratios"]) > 0 for v in ("iwrm[auto]", "iwrm[gramian]")
    )
    assert "Interleaved: GD and the variant built in one process" in markdown
    assert "wrote" in capsys.readouterr().out


def test_compile_benchmark_runs_each_row_in_its_own_process_and_tabulates(capsys: pytest.CaptureFixture[str]) -> None:
    """Eager rows (the compiled ones take minutes on CPU: their figures are in docs/performance.md)."""
    from analysis.compile_benchmark import main as compile_main

    assert compile_main(["--modes", "eager", "--variants", "gd,iwrm-per_sample", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "| gd | eager | - |" in out and "| iwrm-per_sample | eager | - |" in out
    with pytest.raises(SystemExit):
        compile_main(["--modes", "jit"])
