"""`schedmoe train` for 200 steps on 4 ranks, and the same run killed at step 120 and resumed
from its step-100 checkpoint at another EP size: the loss curve, and how far the two end apart.
And a resume at the same layout from the step-50 checkpoint, which must repeat the
uninterrupted curve bit for bit.

    python3 experiments/train_resume.py      # ~2 min on 2 cores; writes results/train_resume.*
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from schedmoe.tools.train.run import save_curve

OUT = Path(__file__).parent / "results"
STEPS, KILL_AT, RANKS, EP_BEFORE, EP_AFTER = 200, 120, 4, 4, 2


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "schedmoe.tools.cli", "train", "--steps", str(STEPS),
            "--ranks", str(RANKS), *args]


def run_until(args: list[str], step: int) -> int:
    """Run, read the progress bar, SIGKILL every rank once it shows `step`; the step seen."""
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            start_new_session=True)
    text = ""
    while proc.poll() is None:
        text += os.read(proc.stderr.fileno(), 4096).decode(errors="replace")
        seen = [int(m) for m in re.findall(rf"(\d+)/{STEPS}", text)]
        if seen and max(seen) >= step:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return max(seen)
    raise RuntimeError(f"the run ended before step {step}:\n{text[-2000:]}")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        full, resumed, ckpt = (os.path.join(tmp, n) for n in ("full.json", "resumed.json", "c"))
        subprocess.run(command("--ep-size", str(EP_BEFORE), "--json", full, "--no-progress"),
                       check=True)
        killed_at = run_until(command("--ep-size", str(EP_BEFORE), "--checkpoint-dir", ckpt),
                              KILL_AT)
        same, only50 = os.path.join(tmp, "same.json"), os.path.join(tmp, "only50")
        shutil.copytree(os.path.join(ckpt, "step-000050"), os.path.join(only50, "step-000050"))
        subprocess.run(command("--ep-size", str(EP_AFTER), "--checkpoint-dir", ckpt, "--resume",
                               "--json", resumed, "--no-progress"), check=True)
        subprocess.run(command("--ep-size", str(EP_BEFORE), "--checkpoint-dir", only50,
                               "--resume", "--json", same, "--no-progress"), check=True)
        a, b, c = (json.loads(Path(p).read_text()) for p in (full, resumed, same))
    end_a, end_b = a["history"][-1]["loss"], b["history"][-1]["loss"]
    record = {
        "command": "python3 experiments/train_resume.py",
        "uninterrupted": a, "resumed": b, "killed_at_step": killed_at,
        "resumed_from": b["resumed_from"].rsplit("/", 1)[-1],
        "final_loss": {"uninterrupted": end_a, "resumed": end_b, "abs_diff": abs(end_a - end_b)},
        "max_abs_diff_after_resume": max(abs(x["loss"] - y["loss"]) for x, y in
                                         zip(a["history"], b["history"])),
        "same_layout": {
            "resumed_from": c["resumed_from"].rsplit("/", 1)[-1],
            "steps_differing": [x["step"] for x, y in zip(a["history"], c["history"])
                                if (x["loss"], x["aux"]) != (y["loss"], y["aux"])]},
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "train_resume.json").write_text(json.dumps(record, indent=1))
    save_curve(a, str(OUT / "train_resume.png"), f"uninterrupted, EP {EP_BEFORE}",
               {f"killed at {killed_at}, resumed from step 100 at EP {EP_AFTER}": b})
    print(json.dumps({k: record[k] for k in ("killed_at_step", "resumed_from", "final_loss",
                                             "max_abs_diff_after_resume", "same_layout")},
                     indent=1))


if __name__ == "__main__":
    main()
