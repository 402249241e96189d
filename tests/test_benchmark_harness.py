"""The benchmark harness's CPU peak-memory measure (benchmarks/_harness.py ``peak_rss_growth``): what the memory
rows of bench_packed_attention and bench_cross_entropy report."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _harness  # noqa: E402

MiB = 2**20
pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")


def test_peak_is_the_runs_own_after_a_larger_freed_setup():
    # the setup touches 256 MiB and frees it; the run's 96 MiB must still show (an earlier measure read 0 here)
    setup = "big = torch.ones(64 * 2**20)\ndel big"
    run = "x = torch.ones(24 * 2**20)"  # 96 MiB of float32, every page written
    grown = _harness.peak_rss_growth("_harness", setup, run)
    assert 90 * MiB <= grown <= 130 * MiB, grown / MiB


def test_peak_counts_a_temporary_freed_before_the_end():
    run = "x = torch.ones(16 * 2**20)\ndel x\ny = torch.ones(2**20)"
    grown = _harness.peak_rss_growth("_harness", "", run)
    assert 60 * MiB <= grown <= 100 * MiB, grown / MiB


def test_a_run_that_allocates_nothing_reads_near_zero():
    grown = _harness.peak_rss_growth("_harness", "big = torch.ones(32 * 2**20)", "y = big[0].item()")
    assert grown < 16 * MiB, grown / MiB


def test_a_failing_run_raises_with_its_error():
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        _harness.peak_rss_growth("_harness", "", "1 / 0")
