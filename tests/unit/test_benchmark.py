"""The benchmark runs end to end at the tiny preset and writes what it promises (no timing asserted).

This file holds the unit tests; the others are in tests/integration/test_benchmark.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis.benchmark import main


def test_existing_results_are_not_overwritten(tmp_path: Path) -> None:
    existing = tmp_path / "benchmark-tiny-cpu-eager.json"
    existing.write_text("{}")
    with pytest.raises(SystemExit):
        main(["--preset", "tiny", "--variants", "gd", "--out", str(tmp_path)])
    assert existing.read_text() == "{}"


@pytest.mark.parametrize(("flag", "message"), [("--variants=gd,nope", "unknown variants"), ("--projector-sizes=a", "--projector-sizes")])
def test_bad_arguments_are_named(tmp_path: Path, flag: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--preset", "tiny", flag, "--out", str(tmp_path)])
    assert message in capsys.readouterr().err
