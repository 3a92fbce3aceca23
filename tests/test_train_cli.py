"""`schedmoe train` end to end: the loss falls; a run killed mid-way and resumed from its last
checkpoint at another layout ends where the uninterrupted run does; at the same layout a run
resumed from any checkpoint is bit-identical to the uninterrupted one, also after a rank was
killed in the middle of a save."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import shutil

import pytest

from schedmoe.errors import ConfigError
from schedmoe.tools.testing import run_ranks
from schedmoe.tools.train.run import TrainConfig, latest_checkpoint, train, train_rank

SMALL = ["--dim", "32", "--hidden-dim", "64", "--batch", "8", "--seq", "32",
         "--checkpoint-every", "10", "--no-progress"]


def schedmoe_train(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "schedmoe.tools.cli", "train", *SMALL, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def test_killed_run_resumes_at_another_layout_and_ends_where_the_full_run_does(uninterrupted,
                                                                             tmp_path):
    resumed = tmp_path / "resumed.json"
    # Kill a run (every rank, SIGKILL) once its step-20 checkpoint is complete.
    ckpt = tmp_path / "ckpt"
    proc = schedmoe_train("--steps", "40", "--ranks", "4", "--ep-size", "2",
                          "--checkpoint-dir", str(ckpt))
    deadline = time.monotonic() + 300
    while latest_checkpoint(ckpt) is None or latest_checkpoint(ckpt).name < "step-000020":
        assert proc.poll() is None and time.monotonic() < deadline, "no step-20 checkpoint"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(ckpt).name in ("step-000020", "step-000030")
    # Resume on 2 ranks at EP 1 (every expert on both), then the remaining steps.
    out = finish(schedmoe_train("--steps", "40", "--ranks", "2", "--ep-size", "1",
                                "--checkpoint-dir", str(ckpt), "--resume", "--json",
                                str(resumed)))
    assert "resumed from" in out
    b = json.loads(resumed.read_text())
    assert b["layout"].startswith("2 ranks = EP 1")
    assert [h["step"] for h in b["history"]] == list(range(1, 41))
    # the same training as the uninterrupted EP 2 x DP 2 run, up to rounding
    losses = [h["loss"] for h in uninterrupted[1]["history"][:40]]
    assert abs(b["history"][-1]["loss"] - losses[-1]) <= 1e-4
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)  # the loss falls
    assert Path(str(resumed).replace(".json", ".png")).stat().st_size > 0


def test_resume_refuses_other_model_settings(tmp_path):
    cfg = TrainConfig(steps=2, dim=32, hidden_dim=64, batch=4, seq=16, checkpoint_every=2)
    train(cfg, ranks=2, checkpoint_dir=str(tmp_path), progress=False, timeout=120)
    cfg.steps, cfg.lr, cfg.hidden_dim = 4, 1e-2, 128  # the shapes change: checked first
    with pytest.raises(Exception, match=r"--hidden-dim 64 \(not 128\), --lr 0.003 \(not 0.01\)"):
        train(cfg, ranks=2, checkpoint_dir=str(tmp_path), resume=True, progress=False,
              timeout=120)
    with pytest.raises(ConfigError, match="--resume needs --checkpoint-dir"):
        train(cfg, resume=True)


def _curve(record: dict) -> list[tuple]:
    return [(h["step"], h["loss"], h["aux"], h["dropped"]) for h in record["history"]]


def _config(steps: int, every: int) -> TrainConfig:
    return TrainConfig(steps=steps, checkpoint_every=every, dim=32, hidden_dim=64, batch=8,
                       seq=32, ep_size=2)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict]:
    """60 steps on 4 ranks (EP 2 x DP 2), a checkpoint every 10."""
    directory = tmp_path_factory.mktemp("uninterrupted")
    return directory, train(_config(60, 10), ranks=4, checkpoint_dir=str(directory),
                            progress=False, timeout=300)


def resume_each(rank: int, world: int, cfg: TrainConfig, directories: list[str]) -> list:
    """One resumed run per directory (each holds one checkpoint), one after the other."""
    return [train_rank(rank, world, cfg, d, True, False) for d in directories]


def test_resume_from_every_checkpoint_is_bit_identical(uninterrupted, tmp_path):
    directory, full = uninterrupted
    steps = list(range(10, 60, 10))
    for k in steps:
        shutil.copytree(directory / f"step-{k:06d}", tmp_path / f"from{k}" / f"step-{k:06d}")
    runs = run_ranks(resume_each, 4, _config(60, 10),
                     [str(tmp_path / f"from{k}") for k in steps], timeout=300)[0]
    for k, resumed in zip(steps, runs):
        assert resumed["resumed_from"].endswith(f"step-{k:06d}")
        assert _curve(resumed) == _curve(full), f"resumed from step {k}"


def killed_while_saving(rank: int, world: int, cfg: TrainConfig, directory: str) -> None:
    """Train; rank 1 is SIGKILLed just before it writes its step-8 shards."""
    import torch.distributed.checkpoint as dcp

    save = dcp.save

    def dying_save(state, checkpoint_id):
        if rank == 1 and Path(checkpoint_id).name.startswith("step-000008"):
            os.kill(os.getpid(), signal.SIGKILL)
        return save(state, checkpoint_id=checkpoint_id)

    dcp.save = dying_save
    train_rank(rank, world, cfg, directory, False, False)


def test_a_rank_killed_during_a_save_resumes_from_the_previous_checkpoint(uninterrupted,
                                                                         tmp_path):
    _, full = uninterrupted
    cfg = _config(12, 4)
    outcomes = run_ranks(killed_while_saving, 4, cfg, str(tmp_path), timeout=120,
                         return_exceptions=True)
    assert all(isinstance(o, Exception) for o in outcomes), outcomes
    assert latest_checkpoint(tmp_path).name == "step-000004"
    resumed = train(cfg, ranks=4, checkpoint_dir=str(tmp_path), resume=True, progress=False,
                    timeout=300)
    assert resumed["resumed_from"].endswith("step-000004")
    assert _curve(resumed) == _curve(full)[:12]
    assert latest_checkpoint(tmp_path).name == "step-000012"
    assert not list(tmp_path.glob("*.partial")), "the next save did not clear the crashed one"


def test_resume_skips_a_damaged_checkpoint_for_the_one_before(uninterrupted, tmp_path):
    directory, full = uninterrupted
    for k in (10, 20):
        shutil.copytree(directory / f"step-{k:06d}", tmp_path / f"step-{k:06d}")
    manifest = tmp_path / "step-000020" / "schedmoe.json"
    manifest.write_text(manifest.read_text().replace('"step": 20', '"step": 21'))
    resumed = train(_config(30, 10), ranks=4, checkpoint_dir=str(tmp_path), resume=True,
                    progress=False, timeout=300)
    assert resumed["resumed_from"].endswith("step-000010")
    assert _curve(resumed) == _curve(full)[:30]


def test_the_log_carries_the_experts_load(uninterrupted):
    """Per step, each layer's balancedness (mean / max pairs per EP rank, a moving average
    summed over all 4 ranks); at the end, each layer's load per expert and per rank."""
    _, record = uninterrupted
    cfg = record["config"]
    for entry in record["history"]:
        assert len(entry["balancedness"]) == cfg["layers"]
        assert all(0 < b <= 1 for b in entry["balancedness"])
    assert len(record["load"]) == cfg["layers"]
    routed = cfg["batch"] * cfg["seq"] * cfg["top_k"]  # pairs per step over all ranks
    for load in record["load"].values():
        assert len(load["tokens"]) == cfg["num_experts"] and len(load["per_rank"]) == 2
        assert sum(load["tokens"]) == pytest.approx(routed, rel=1e-4)  # dropless: all routed
        assert load["balancedness"] == pytest.approx(
            sum(load["per_rank"]) / 2 / max(load["per_rank"]))
        assert load["dropped_fraction"] == 0.0
        assert record["history"][-1]["balancedness"] == [
            round(v["balancedness"], 4) for v in record["load"].values()]
