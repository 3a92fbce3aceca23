"""Process groups and where ranks sit: the bottom of the wire.

- `groups.py`: the expert-parallel group (`EPGroup`; single-process when torch.distributed is
  not initialised) and collectives that turn a backend failure into `PeerError`.
- `topology.py`: which ranks share a node, and the intra-/inter-node sub-groups the
  hierarchical algorithms use (created once, collectively, and released).

Data plane. May import: `errors`. Imported by `a2a_algos/`, `exchange/` and everything above.
"""
