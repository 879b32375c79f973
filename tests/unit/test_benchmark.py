"""The benchmark runs end to end at the tiny preset and writes what it promises (no timing asserted).

This file holds the unit tests; the others are in tests/integration/test_benchmark.py.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest

from analysis.benchmark import _peak_resident_mib, _restart_resident_peak, main


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


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the kernel's peak-memory reset is Linux's")
def test_a_variant_below_an_earlier_peak_still_measures_its_own_growth() -> None:
    # A priming run (or the imports) peaks higher than the variant: without the restart it would read 0 MiB.
    # Fresh anonymous mappings, touched page by page, so that no allocator's free memory hides the growth.
    def touched(mib: int) -> mmap.mmap:
        region = mmap.mmap(-1, mib * 2**20)
        for offset in range(0, len(region), mmap.PAGESIZE):
            region[offset] = 1
        return region

    touched(64).close()
    _restart_resident_peak()
    before = _peak_resident_mib()
    variant = touched(16)
    grown = _peak_resident_mib() - before
    variant.close()
    assert 12 < grown < 40, grown
