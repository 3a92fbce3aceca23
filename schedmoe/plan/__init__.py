"""Token plans and layouts: where each routed token goes, and how the exchanged rows are laid
out.

- `plans.py`: `DispatchPlan` (which (token, choice) pairs are kept, where each goes, their
  combine weights), `encode` (tokens -> rows for the experts) and `decode` (expert outputs ->
  tokens, weighted).
- `layout.py`: `PaddedLayout` (`[W, n, C, M]`, every segment padded to C) and `RaggedLayout`
  (`[N, M]` rows, no padding): how a schedule chunks the rows, their split sizes, and how the
  experts see them. The choice is made once per call (`layout_for`) and the other modules ask
  the layout instead of branching on it.
- `placement.py`: which logical expert each physical slot of each rank holds, and the
  EPLB-style planner that balances the ranks under skewed routing (replicas, node-first
  packing, moves in the objective), and the mapping of a call's pairs onto physical slots
  (`PhysicalPairs`).

Data plane. May import: `errors`, `comm/` (index tensors sent without a sync).
"""
