"""`experiments/gpu_check.py --dry-run`: the GPU script's every check runs on CPU tensors (the
layer on the checking lanes), so the script cannot rot between the GPU runs it exists for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "gpu_check.py"


def test_gpu_check_dry_run_passes_every_check(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["dry_run"] and result["device"] == "cpu (dry run)"
    checks = result["checks"]
    assert set(checks) == {"agree", "syncs", "sanitizer", "trace", "codecs", "speed"}
    assert all(check["ok"] for check in checks.values()), checks
    # on the checking lanes every scheduler x codec equals the inline CPU run exactly
    assert checks["agree"]["worst_lossless_rel_error"] == 0.0
    assert all(case["max_rel_error"] == 0.0 for case in checks["agree"]["cases"])
    assert "sanitized steps: done" in checks["sanitizer"]["output_tail"]
    assert (tmp_path / "trace_pipeline.json").exists() and (tmp_path / "gpu_check.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run")
def test_gpu_check_refuses_to_run_without_a_gpu_unless_dry():
    done = subprocess.run([sys.executable, str(SCRIPT), "--only", "codecs"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "--dry-run" in done.stderr
