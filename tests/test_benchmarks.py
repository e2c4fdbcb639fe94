"""The benchmark suite at smoke size, so that it keeps working (timings are not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.xdist_group("deepspeed")  # it launches torchrun for the export benchmark
def test_benchmark_suite_smoke(tmp_path):
    out, raw = tmp_path / "BENCHMARKS.md", tmp_path / "raw.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "run.py"), "--smoke", "--output",
                           str(out), "--json", str(raw)], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for heading in ("### 1. Save", "### 2. Verify", "Quick mode", "### 3. Resume", "### 4. Export", "### 5. Walk",
                    "### 6. PyTorch Distributed Checkpoint", "## GPU"):
        assert heading in text
    results = json.loads(raw.read_text())
    assert results["save"][0]["ratio"] > 0 and results["resume"]["ratio_verified_vs_plain"] > 0
    assert "error" not in results["export"], results["export"]
    assert results["export"]["zero_to_fp32"]["failures"] == 0 and results["export"]["ckptmgr export"]["failures"] == 0
    assert results["walk"]["files"] >= 400
    assert "error" not in results["dcp"], results["dcp"]
    dcp = results["dcp"]
    assert dcp["parity"]["bitwise_equal"] and not any(r["failures"] for r in dcp["export"].values())


def test_ruff_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", REPO], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
