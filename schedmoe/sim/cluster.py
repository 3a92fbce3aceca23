"""A cluster as the simulator sees it, presets stored as data files, and the A2A cost model.

Notation: P ranks = N nodes x L ranks per node; an exchange of `nbytes` per rank sends
m = nbytes / P to every rank (itself included: a local copy).

Links. Inside a node each rank has its own link (NVLink, or PCIe through the host) of
`intra_gbyte_s` per direction. Between nodes the node's `nics_per_node` NICs are shared by its L
ranks, so a rank gets `min(1, nics/L)` of a NIC while all send (ScheMoE's testbed: one 100 Gb/s
NIC for four GPUs). Every message pays its link's latency, and runs at a size-dependent
efficiency `e(s) = e_large + (1 - e_large) / (1 + s / knee)`: near 1 for small messages, falling
to `e_large` far above the knee (host staging buffers and caches that large transfers outgrow);
with no knee (0) every message runs at `e_large`.
A node-wide `bus_gbyte_s` (PCIe without GPUDirect: every byte in or out of a GPU crosses the
host's bus) bounds the node's traffic when it is set; traffic that runs at once shares it.

Algorithms (each one's real message pattern on the wire; `issue_seconds` is the work each
exchange costs the issuing side: its fixed cost `a2a_call_us` (2dh runs four phases, pipe two
calls on two channels and, on CPUs, threads) and 2dh's layout copies):
- `nccl` (flat): L - 1 intra-node messages, then P - L inter-node ones, of m each
  (ScheMoE's t = L t1 + (P - L) t2), plus the local copy.
- `pipe`: the same two sets at once on two channels: max of the two, and of their bus time.
- `2dh`: a stride copy, L - 1 intra-node messages of N m, a second copy, N - 1 inter-node
  messages of L m (Tutel's hierarchical A2A).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import ConfigError
from ..control.validation import number, one_of, read_json
from .codecs import CodecModel, codec_model

PRESETS = Path(__file__).parent / "clusters"
ALGORITHMS = ("nccl", "2dh", "pipe")


@dataclass
class Cluster:
    """Hardware of a cluster, for what-if simulation (defaults: H100 nodes, a 400 Gbit/s NIC per
    GPU). Any field can be fitted from measurements (calibrate.py)."""

    name: str = "custom"
    nodes: int = 4
    ranks_per_node: int = 8
    # inside a node: per rank and direction
    intra_gbyte_s: float = 450.0
    intra_latency_us: float = 2.0
    intra_knee_mb: float = 0.0  # 0: the same efficiency at every size
    intra_large_efficiency: float = 1.0  # fraction of the rate reached far above the knee
    # between nodes: the node's NICs, shared by its ranks
    nic_gbit: float = 400.0
    nics_per_node: int = 8
    inter_latency_us: float = 3.0
    inter_knee_mb: float = 0.0
    inter_large_efficiency: float = 1.0
    bus_gbyte_s: float = 0.0  # node-wide bus that all traffic crosses; 0: none
    # compute
    gemm_tflops: float = 400.0  # achieved GEMM rate
    gemm_half_rows: float = 0.0  # rows at which an expert GEMM reaches half its rate
    memory_gbyte_s: float = 2500.0  # layout copies, dispatch scatter and combine gather
    task_overhead_us: float = 10.0  # launch + bookkeeping per task
    backward_factor: float = 2.0  # expert backward / forward
    compute_slowdown: float = 0.0  # interference while an exchange is in flight (timeline.py)
    comm_slowdown: float = 0.0
    a2a_call_us: dict = field(default_factory=dict)  # per algorithm: fixed cost of each exchange
    codecs: dict = field(default_factory=dict)  # per codec: CodecModel fields that differ

    @property
    def world(self) -> int:
        return self.nodes * self.ranks_per_node

    def codec(self, name: str) -> CodecModel:
        return codec_model(name, self.codecs)

    def validate(self) -> None:
        """Types, finiteness and ranges of every field (a NaN would make the simulator spin)."""
        if not isinstance(self.name, str):
            raise ConfigError(f"cluster name must be a string, got {self.name!r}")
        where = f"cluster {self.name!r}"
        counts = {"nodes": 1 << 20, "ranks_per_node": 1 << 12, "nics_per_node": 1 << 12}
        positive = {"intra_gbyte_s", "nic_gbit", "gemm_tflops", "memory_gbyte_s"}
        fractions = {"intra_large_efficiency", "inter_large_efficiency"}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in counts:
                number(where, f.name, value, integer=True, low=1, high=counts[f.name])
            elif f.name not in ("name", "a2a_call_us", "codecs"):
                number(where, f.name, value, high=1 if f.name in fractions else 1e12,
                       above=0 if f.name in positive | fractions else None)
        for name, table in (("a2a_call_us", self.a2a_call_us), ("codecs", self.codecs)):
            if not isinstance(table, dict):
                raise ConfigError(f"{where}: {name} must be a JSON object, got {table!r}")
        for algorithm, us in self.a2a_call_us.items():
            one_of(where, "an a2a_call_us key", algorithm, ALGORITHMS)
            number(where, f"a2a_call_us[{algorithm!r}]", us, high=1e12)
        for codec in self.codecs:
            if not isinstance(codec, str):
                raise ConfigError(f"{where}: codec names must be strings, got {codec!r}")
            self.codec(codec)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, source: str = "cluster file") -> "Cluster":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a cluster is a JSON object of fields, got "
                              f"{type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known - {"description", "assumptions", "calibration"}
        if unknown:
            raise ConfigError(f"{source}: unknown fields {sorted(unknown)}; known: "
                              f"{sorted(known)}")
        cluster = cls(**{k: v for k, v in data.items() if k in known})
        cluster.validate()
        return cluster


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.json"))


def load_cluster(name_or_path: str) -> Cluster:
    """A preset by name (`preset_names()`) or a cluster file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESETS / f"{name_or_path}.json"
        if not path.exists():
            raise ConfigError(f"no cluster preset {name_or_path!r}; presets: "
                              f"{preset_names()}, or give a path to a JSON file")
    data = read_json(path, "cluster file")
    return Cluster.from_json(data, str(path))


def _efficiency(size: float, knee_mb: float, large: float) -> float:
    if not knee_mb:
        return large
    return large + (1.0 - large) / (1.0 + size / (knee_mb * 1e6))


def _messages(count: int, size: float, rate: float, latency_us: float, knee_mb: float,
              large: float) -> float:
    """Seconds for `count` messages of `size` bytes, one after another, on one link."""
    if count <= 0 or size <= 0:
        return 0.0
    return count * (latency_us * 1e-6 + size / (rate * _efficiency(size, knee_mb, large)))


def intra_seconds(c: Cluster, count: int, size: float) -> float:
    return _messages(count, size, c.intra_gbyte_s * 1e9, c.intra_latency_us, c.intra_knee_mb,
                     c.intra_large_efficiency)


def inter_seconds(c: Cluster, count: int, size: float) -> float:
    share = min(1.0, c.nics_per_node / c.ranks_per_node)
    return _messages(count, size, c.nic_gbit / 8 * 1e9 * share, c.inter_latency_us,
                     c.inter_knee_mb, c.inter_large_efficiency)


def bus_seconds(c: Cluster, node_bytes: float) -> float:
    """Time the node's bus needs for `node_bytes` in and out of its GPUs; 0 without a bus."""
    return node_bytes / (c.bus_gbyte_s * 1e9) if c.bus_gbyte_s else 0.0


def issue_seconds(c: Cluster, algorithm: str, nbytes: float) -> float:
    """Work of one exchange on the issuing (compute) side: its fixed cost (`a2a_call_us`:
    launches, the calls of its phases, thread hand-offs) and, for 2dh, its two layout copies
    (a read and a write of every byte each). The compute stream pays it, so it does not hide
    behind the exchanges in flight."""
    copies = 2 * 2 * nbytes / (c.memory_gbyte_s * 1e9) if algorithm == "2dh" else 0.0
    return c.a2a_call_us.get(algorithm, 0.0) * 1e-6 + copies


def a2a_seconds(c: Cluster, algorithm: str, nbytes: float) -> float:
    """Time on the wire of one exchange of `nbytes` per rank (the module docstring's model)."""
    L, N, P = c.ranks_per_node, c.nodes, c.world
    m = nbytes / P
    copy = m / (c.memory_gbyte_s * 1e9)  # the message a rank sends itself
    # bytes in and out of the node's GPUs: every intra message leaves one and enters another
    bus_intra = bus_seconds(c, 2 * L * (L - 1) * m)
    bus_inter = bus_seconds(c, 2 * L * (P - L) * m)
    if algorithm == "nccl":
        return copy + max(intra_seconds(c, L - 1, m), bus_intra) + \
            max(inter_seconds(c, P - L, m), bus_inter)
    if algorithm == "pipe":
        return copy + max(intra_seconds(c, L - 1, m), inter_seconds(c, P - L, m),
                          bus_intra + bus_inter)
    if algorithm == "2dh":
        return max(intra_seconds(c, L - 1, m * N), bus_intra) + \
            max(inter_seconds(c, N - 1, m * L), bus_inter)
    raise ConfigError(f"no cost model for A2A algorithm {algorithm!r}; known: {ALGORITHMS}")


def exchange_seconds(c: Cluster, algorithm: str, nbytes: float) -> float:
    """One exchange on its own: issuing work plus time on the wire."""
    return issue_seconds(c, algorithm, nbytes) + a2a_seconds(c, algorithm, nbytes)
