"""An emulated multi-node cluster on one machine: network namespaces, veth links, tc tbf.

Each node is a network namespace with one interface (eth0) on a shared bridge (the "switch",
itself in a namespace). Both directions of every node's link are shaped with `tc tbf` to
`rate`, so inter-node traffic crosses a 1 Gbit/s NIC (by default) while ranks on the same node
talk over loopback. `launch` starts torchrun in every node namespace (L ranks each, gloo bound to
eth0 through GLOO_SOCKET_IFNAME). Everything created is removed on exit, after an error or
Ctrl-C too.

With `pin_cores`, each node's processes run on cores of their own (`taskset`).

Needs root, iproute2 and util-linux (taskset). The kernel here has no netem, so there is no
latency emulation: the links have bandwidth limits only (tbf's `latency` is its queue limit,
not a delay).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from types import TracebackType

from ..errors import SchedMoEError


class EmulationError(SchedMoEError):
    """The emulated cluster could not be created or a node's processes failed."""


@dataclass(frozen=True)
class ClusterSpec:
    nodes: int = 2
    ranks_per_node: int = 2
    rate: str = "1gbit"  # tc rate of each node's link, both directions
    burst: str = "256kb"
    queue_latency: str = "50ms"  # tbf queue limit
    subnet: str = "10.213.0"  # node i is SUBNET.(i + 1); only inside our namespaces
    port: int = 29561
    pin_cores: bool = False  # node i's processes on cores of their own (taskset), as on a
    # real cluster where nodes do not share CPUs: with 2 nodes x 1 rank on 2 cores, a core each

    def cores(self, node: int) -> list[int]:
        """The cores node `node` runs on when pinned: an equal share of this machine's."""
        available = sorted(os.sched_getaffinity(0))
        share = max(1, len(available) // self.nodes)
        first = (node * share) % len(available)
        return available[first:first + share]


def _run(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise EmulationError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}")


class EmulatedCluster:
    """Context manager: `with EmulatedCluster(spec) as c: c.launch([...])`."""

    def __init__(self, spec: ClusterSpec = ClusterSpec()) -> None:
        self.spec = spec
        tag = f"{os.getpid() % 100000}"
        self.switch = f"smoe{tag}-sw"
        self.namespaces = [f"smoe{tag}-n{i}" for i in range(spec.nodes)]
        self._veth = [f"sm{tag}v{i}" for i in range(spec.nodes)]
        self._created: list[str] = []
        self._old_sigterm = None

    def address(self, node: int) -> str:
        return f"{self.spec.subnet}.{node + 1}"

    def __enter__(self) -> "EmulatedCluster":
        check_can_emulate()
        self._old_sigterm = signal.signal(signal.SIGTERM, _raise_exit)
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _create(self) -> None:
        s = self.spec
        _run("ip", "netns", "add", self.switch)
        self._created.append(self.switch)
        _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.switch, "link", "set", "br0", "up")
        for i, (ns, veth) in enumerate(zip(self.namespaces, self._veth)):
            _run("ip", "netns", "add", ns)
            self._created.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "link", "add", veth, "netns", ns, "type", "veth", "peer", "name",
                 f"{veth}s", "netns", self.switch)
            _run("ip", "-n", ns, "link", "set", veth, "name", "eth0")
            _run("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", self.switch, "link", "set", f"{veth}s", "master", "br0")
            _run("ip", "-n", self.switch, "link", "set", f"{veth}s", "up")
            for where, dev in ((ns, "eth0"), (self.switch, f"{veth}s")):  # both directions
                _run("ip", "netns", "exec", where, "tc", "qdisc", "replace", "dev", dev, "root",
                     "tbf", "rate", s.rate, "burst", s.burst, "latency", s.queue_latency)

    def close(self) -> None:
        """Delete every namespace this cluster created (their links and qdiscs go with them)."""
        for ns in reversed(self._created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._created.clear()
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None

    def launch(self, module_args: list[str], timeout: float = 600.0,
               env: dict[str, str] | None = None) -> list[str]:
        """Run `python -m torch.distributed.run ... -m <module_args>` on every node; returns each
        node's stdout. Raises EmulationError with the failing node's output."""
        s = self.spec
        procs = []
        for i, ns in enumerate(self.namespaces):
            pin = ["taskset", "-c", ",".join(map(str, s.cores(i)))] if s.pin_cores else []
            cmd = ["ip", "netns", "exec", ns, *pin, "env", "GLOO_SOCKET_IFNAME=eth0",
                   *[f"{k}={v}" for k, v in (env or {}).items()],
                   sys.executable, "-m", "torch.distributed.run", f"--nnodes={s.nodes}",
                   f"--node-rank={i}", f"--nproc-per-node={s.ranks_per_node}",
                   f"--master-addr={self.address(0)}", f"--master-port={s.port}",
                   "-m", *module_args]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, start_new_session=True))
        outputs, failed = [], []
        try:
            for i, p in enumerate(procs):
                out, err = p.communicate(timeout=timeout)
                outputs.append(out)
                if p.returncode:
                    failed.append(f"node {i} exited with {p.returncode}; its output ends:\n"
                                  f"{out[-2000:]}\n{err[-4000:]}")
        except subprocess.TimeoutExpired:
            failed.append(f"the nodes did not finish within {timeout:.0f} s")
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        if failed:
            raise EmulationError("emulated cluster run failed:\n" + "\n".join(failed))
        return outputs


def check_can_emulate() -> None:
    """Raise EmulationError saying what is missing (root, ip, tc, taskset)."""
    if os.geteuid() != 0:
        raise EmulationError("emulating nodes needs root (it creates network namespaces and tc "
                             "qdiscs); run as root, or leave out --emulate-nodes")
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("taskset", "util-linux")):
        if shutil.which(tool) is None:
            raise EmulationError(f"emulating nodes needs `{tool}` (Debian package {package})")


def can_emulate() -> str | None:
    """None if this machine can emulate a cluster, else the reason it cannot."""
    try:
        check_can_emulate()
    except EmulationError as exc:
        return str(exc)
    return None


def _raise_exit(signum, frame) -> None:
    raise SystemExit(128 + signum)
