"""The benchmark scripts run end to end on a tiny model and write their tables (not timed)."""

import subprocess
import sys

import pytest
from conftest import ROOT

TINY = ["--hidden=32", "--intermediate=64", "--heads=2", "--layers=1", "--vocab=200", "--seq=16"]


@pytest.mark.slow
def test_calibration_benchmark_writes_side_by_side_table(tmp_path):
    out = tmp_path / "results.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "calibration.py"), *TINY, "--batches=20"]
    subprocess.run([*cmd, f"--out={out}"], check=True, capture_output=True)
    text = out.read_text()
    for row in ("| evagraph |", "| peft |", "| plain forward x"):
        assert row in text
    assert "evagraph vs PEFT" in text and "per-layer ranks equal" in text


@pytest.mark.slow
def test_rows_needed_benchmark_compares_with_held_out_pca(tmp_path):
    out = tmp_path / "results.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "rows_needed.py"), *TINY, "--batches=20"]
    args = ["--grid=2,5,20", "--reference-batches=10", f"--out={out}"]
    subprocess.run([*cmd, *args], check=True, capture_output=True)
    text = out.read_text()
    for row in ("| peft |", "| evagraph |", "| exact PCA of the first 2 |", "first 20 |"):
        assert row in text
    assert "PEFT's components" in text or "every prefix reaches" in text
