"""`schedmoe train` end to end: the loss falls, and a run killed mid-way and resumed from its
last checkpoint at another layout ends where the uninterrupted run does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from schedmoe.errors import ConfigError
from schedmoe.train.run import TrainConfig, latest_checkpoint, train

SMALL = ["--dim", "32", "--hidden-dim", "64", "--batch", "8", "--seq", "32",
         "--checkpoint-every", "10", "--no-progress"]


def schedmoe_train(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "schedmoe.cli", "train", *SMALL, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def test_killed_run_resumes_at_another_layout_and_ends_where_the_full_run_does(tmp_path):
    full, resumed = tmp_path / "full.json", tmp_path / "resumed.json"
    finish(schedmoe_train("--steps", "40", "--ranks", "4", "--ep-size", "4", "--json", str(full)))
    # Kill a run (every rank, SIGKILL) once its step-20 checkpoint is complete.
    ckpt = tmp_path / "ckpt"
    proc = schedmoe_train("--steps", "40", "--ranks", "4", "--ep-size", "4",
                          "--checkpoint-dir", str(ckpt))
    deadline = time.monotonic() + 300
    while latest_checkpoint(ckpt) is None or latest_checkpoint(ckpt).name < "step-000020":
        assert proc.poll() is None and time.monotonic() < deadline, "no step-20 checkpoint"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(ckpt).name in ("step-000020", "step-000030")
    # Resume on 2 ranks at EP 2, then the remaining steps.
    out = finish(schedmoe_train("--steps", "40", "--ranks", "2", "--ep-size", "2",
                                "--checkpoint-dir", str(ckpt), "--resume", "--json",
                                str(resumed)))
    assert "resumed from" in out
    a, b = (json.loads(p.read_text()) for p in (full, resumed))
    assert b["layout"].startswith("2 ranks = EP 2")
    assert [h["step"] for h in b["history"]] == list(range(1, 41))
    losses = [h["loss"] for h in a["history"]]
    assert abs(b["history"][-1]["loss"] - losses[-1]) <= 1e-4
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)  # the loss falls
    assert Path(str(full).replace(".json", ".png")).stat().st_size > 0


def test_resume_refuses_other_model_settings(tmp_path):
    cfg = TrainConfig(steps=2, dim=32, hidden_dim=64, batch=4, seq=16, checkpoint_every=2)
    train(cfg, ranks=2, checkpoint_dir=str(tmp_path), progress=False, timeout=120)
    cfg.steps, cfg.lr = 4, 1e-2
    with pytest.raises(Exception, match=r"--lr 0.003 \(not 0.01\)"):
        train(cfg, ranks=2, checkpoint_dir=str(tmp_path), resume=True, progress=False,
              timeout=120)
    with pytest.raises(ConfigError, match="--resume needs --checkpoint-dir"):
        train(cfg, resume=True)
