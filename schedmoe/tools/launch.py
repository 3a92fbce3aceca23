"""Start W local ranks, run a function on each, and collect what they return.

Used by `schedmoe bench`, `schedmoe train` and tests (through `schedmoe.tools.testing`). A rank that
raises, dies or hangs turns into a `RankError` naming the rank and carrying its traceback,
within `timeout` seconds; nothing waits for gloo's 30-minute default. The launcher owns its
ranks: signals reach them, and none outlives it (`spawn`).
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import select
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..errors import RankError
from ..comm.topology import release as release_groups
from ..control.validation import number


def run_ranks_here(fn: Callable[..., Any], args: Sequence[Any] = (), ranks: int | None = None,
                   timeout: float = 600.0, collective_timeout: float = 120.0) -> list[Any]:
    """`fn(rank, world_size, *args)` on every rank; the ranks' results in rank order. Under
    torchrun (RANK and WORLD_SIZE set) this process is one rank (results all-gathered);
    otherwise local ranks are spawned: one per GPU with NCCL, else `ranks` (default 4) gloo
    ranks sharing the CPU cores; once one fails, the others are stopped within
    `FAIL_FAST_GRACE` seconds (not at their collective timeout)."""
    number("run_ranks_here", "timeout", timeout, above=0)
    number("run_ranks_here", "collective_timeout", collective_timeout, above=0)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = "nccl" if gpus else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timedelta(seconds=collective_timeout))
        try:
            mine = fn(dist.get_rank(), dist.get_world_size(), *args)
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine)
        except BaseException:
            # This rank's own error first: the cleanup below may abort the process in gloo.
            traceback.print_exc()
            sys.stderr.flush()
            raise
        finally:
            release_groups()
            dist.destroy_process_group()
        return gathered
    world = planned_world(ranks)
    threads = 1 if gpus else max(1, (os.cpu_count() or 1) // world)
    return spawn(fn, world, args, backend=backend, timeout=timeout,
                 collective_timeout=collective_timeout, threads_per_rank=threads,
                 grace=FAIL_FAST_GRACE)


FAIL_FAST_GRACE = 5.0  # seconds a command's ranks get to finish once one of them has failed


def planned_world(ranks: int | None = None) -> int:
    """The world size `run_ranks_here` runs: torchrun's, else `ranks` (a positive int), else
    one rank per GPU, else 4."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if ranks is not None:
        number("local ranks", "ranks", ranks, integer=True, low=1, high=MAX_LOCAL_RANKS)
        return ranks
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return gpus if gpus else 4


MAX_LOCAL_RANKS = 256


class RemoteError(Exception):
    """Stand-in for a rank's exception that could not be pickled back."""


def spawn(fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (), *,
          backend: str = "gloo", timeout: float = 120.0, collective_timeout: float = 20.0,
          threads_per_rank: int = 1, return_exceptions: bool = False,
          env: dict[str, str] | None = None, grace: float | None = None) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned ranks of one process group.

    Returns the ranks' return values (which must pickle), in rank order. If a rank raises, the
    exception is raised here as a RankError with every failed rank's traceback (the first to
    fail first), or, with `return_exceptions=True`, returned in that rank's place (its
    traceback text in `exc.remote_traceback`). A rank still running after `timeout` seconds
    dumps its stack, is killed, and fails the call. `collective_timeout` bounds every
    collective inside the ranks. With `grace`, once a rank has failed the others get `grace`
    seconds to finish before they are stopped (rather than waiting for their collective
    timeout). SIGINT and SIGTERM to this process reach every rank; ranks still running
    `STOP_WAIT` seconds later are killed, then the signal takes its course here. A rank never
    outlives this process (each watches it, see `_die_with`).
    """
    # Ranks fork from a server that has imported torch and schedmoe once (start-up ~0.1 s a
    # rank instead of seconds: "spawn" imports torch in every rank); the server never touches
    # CUDA, so forked ranks may. Each rank gets this process's environment of now.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "schedmoe"])
    with tempfile.TemporaryDirectory(prefix="schedmoe-spawn-") as tmp:
        tmpdir = Path(tmp)
        procs = [
            ctx.Process(target=_rank_main, daemon=False, args=(
                fn, rank, world_size, tuple(args), backend, str(tmpdir), collective_timeout,
                threads_per_rank, {**os.environ, **(env or {})}, os.getpid()))
            for rank in range(world_size)
        ]
        signals: list[int] = []
        previous = _forward_signals(procs, signals)
        outcome = _Outcome()
        try:
            for p in procs:
                p.start()
            _watch(procs, tmpdir, timeout, grace, signals, outcome)
        finally:  # no rank outlives the call or its working directory
            _dump_stacks(tmpdir, procs, outcome.hung)
            _stop(procs, wait=STOP_WAIT if signals else 0.0)
            _restore_signals(previous)
        if signals:
            signal.raise_signal(signals[0])  # KeyboardInterrupt, or the default SIGTERM exit
        return _collect(tmpdir, procs, outcome, timeout, grace, return_exceptions)


STOP_WAIT = 5.0  # seconds ranks get to end after a forwarded signal


@dataclass
class _Outcome:
    failed: list[int] = field(default_factory=list)  # ranks that failed, in that order
    hung: list[int] = field(default_factory=list)  # still running at the timeout
    stopped: list[int] = field(default_factory=list)  # stopped `grace` s after a failure


def _watch(procs: list, tmpdir: Path, timeout: float, grace: float | None,
           signals: list[int], outcome: _Outcome) -> None:
    """Wait for the ranks: until all ended, a signal came, the timeout passed, or `grace`
    seconds after the first failure."""
    deadline, cut = time.monotonic() + timeout, None
    ended: set[int] = set()
    while True:
        for rank, p in enumerate(procs):
            if rank not in ended and not p.is_alive():
                ended.add(rank)
                if p.exitcode != 0 or not (tmpdir / f"rank{rank}.pkl").exists():
                    outcome.failed.append(rank)
                    if grace is not None and cut is None:
                        cut = time.monotonic() + grace
        alive = [r for r, p in enumerate(procs) if p.is_alive()]
        now = time.monotonic()
        if not alive or signals:
            return
        if now >= deadline:
            outcome.hung = alive
            return
        if cut is not None and now >= cut:
            outcome.stopped = alive
            return
        wait([procs[r].sentinel for r in alive],
             timeout=min(0.5, deadline - now, (cut - now) if cut is not None else 0.5))


def _forward_signals(procs: list, signals: list[int]) -> dict:
    """While ranks run, SIGINT and SIGTERM are recorded in `signals` and sent on to every
    running rank (only the main thread can take signals; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def forward(signum, _frame):
        signals.append(signum)
        for p in procs:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signum)

    return {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _stop(procs: list, wait: float) -> None:
    """Give running ranks `wait` seconds to end, then kill them; reap every rank."""
    deadline = time.monotonic() + wait
    for p in procs:
        if p.pid is not None:
            p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.pid is not None and p.is_alive():
            p.kill()
            p.join()


def _dump_stacks(tmpdir: Path, procs: list, hung: list[int], wait: float = 5.0) -> None:
    """Ask each hung rank to write its Python stack (SIGUSR1, see `_rank_main`) and wait for it."""
    for rank in hung:
        os.kill(procs[rank].pid, signal.SIGUSR1)
    deadline = time.monotonic() + wait
    for rank in hung:
        stack_file = tmpdir / f"rank{rank}.stack"
        while time.monotonic() < deadline and procs[rank].is_alive():
            if stack_file.exists() and stack_file.stat().st_size > 0:
                time.sleep(0.2)  # let the dump of every thread finish
                break
            time.sleep(0.05)


def _collect(tmpdir: Path, procs: list, outcome: _Outcome, timeout: float,
             grace: float | None, return_exceptions: bool) -> list[Any]:
    results: list[Any] = []
    failures: dict[int, str] = {}
    for rank, proc in enumerate(procs):
        result_file = tmpdir / f"rank{rank}.pkl"
        stack_file = tmpdir / f"rank{rank}.stack"
        if result_file.exists():
            status, value, tb = pickle.loads(result_file.read_bytes())
            if status == "ok":
                results.append(value)
                continue
            failures[rank] = f"--- rank {rank} raised:\n{tb}"
            results.append(value)
            continue
        stack = stack_file.read_text() if stack_file.exists() else ""
        if rank in outcome.hung:
            why = f"rank {rank} did not finish within {timeout:.0f} s (hang?)"
        elif rank in outcome.stopped:
            why = (f"rank {rank} was stopped {grace:g} s after rank {outcome.failed[0]} "
                   "failed")
        else:
            why = f"rank {rank} died with exit code {proc.exitcode} before returning"
        failures[rank] = f"--- {why}\n{stack}"
        err = RankError(why)
        err.remote_traceback = stack
        results.append(err)
    if failures and not return_exceptions:
        first = [r for r in outcome.failed if r in failures]
        order = first + [r for r in sorted(failures) if r not in first]
        raise RankError(f"{len(failures)} of {len(procs)} ranks failed:\n"
                        + "\n".join(failures[r] for r in order))
    return results


def _rank_main(fn, rank, world_size, args, backend, tmpdir, collective_timeout, threads,
               env, launcher) -> None:
    _die_with(launcher)
    os.environ.clear()  # the launcher's environment, not the fork server's
    os.environ.update(env)
    tmp = Path(tmpdir)
    stack_file = open(tmp / f"rank{rank}.stack", "w")
    # A hung rank writes its Python stack when the parent asks, just before it kills it.
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    try:
        dist.init_process_group(backend, init_method=f"file://{tmp / 'rendezvous'}",
                                rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=collective_timeout))
        # Every rank past its connections first: a rank that fails at once and exits would
        # otherwise break a slower peer's connection set-up (gloo's connectFullMesh).
        dist.barrier()
        value = fn(rank, world_size, *args)
        release_groups()
        dist.destroy_process_group()
    except BaseException as exc:  # report everything, including KeyboardInterrupt
        # Reported before anything else runs: a cleanup with exchanges of the other ranks
        # still arriving can abort this process in gloo, and its own error would be lost.
        tb = traceback.format_exc()
        exc.remote_traceback = tb
        _report(tmp, rank, ("error", _picklable(exc, tb), tb))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # the launcher tells failures by the exit code, without reading results
    faulthandler.unregister(signal.SIGUSR1)
    _report(tmp, rank, ("ok", value, ""))


def _report(tmp: Path, rank: int, result: tuple[str, Any, str]) -> None:
    """This rank's result or error, for the launcher (written whole, then renamed)."""
    (tmp / f"rank{rank}.tmp").write_bytes(pickle.dumps(result))
    os.replace(tmp / f"rank{rank}.tmp", tmp / f"rank{rank}.pkl")


def _die_with(launcher: int) -> None:
    """End this rank when the launcher ends, even SIGKILLed (the fork server, this rank's
    parent, lives as long as its ranks do, so it cannot do it): a daemon thread waits on the
    launcher's pidfd (Linux >= 5.3; elsewhere the launcher's own cleanup is all there is)."""
    try:
        fd = os.pidfd_open(launcher)
    except ProcessLookupError:  # already gone
        os.kill(os.getpid(), signal.SIGKILL)
    except (AttributeError, OSError):
        return

    def watch() -> None:
        select.select([fd], [], [])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="schedmoe-launcher-watch").start()


def _picklable(exc: BaseException, tb: str) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        err = RemoteError(f"{type(exc).__name__}: {exc}")
        err.remote_traceback = tb
        return err
