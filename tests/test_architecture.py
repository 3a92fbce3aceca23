"""The package's layout holds (docs/architecture.md): folders import only what their
`__init__.py` says they may, lower layers never import higher ones, no cycle between folders
(imports inside functions included), `import schedmoe` stays light, and the root stays small.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "schedmoe"
# The layers, bottom up: a unit may import its own layer and those below.
LAYERS = [
    {"errors", "registry"},
    {"comm", "streams", "routing", "plan", "ops", "a2a_algos", "exchange"},  # data plane
    {"control", "sim", "schedulers"},  # control plane
    {"layer"},
    {"parallel", "overlap", "hf"},  # built on the layer
    {"tools"},
]
ROOT_MAY_IMPORT = {"errors": set(), "registry": {"errors"},
                   "layer": set().union(*LAYERS[:3])}


def _unit(module: str) -> str | None:
    """The folder (or root module) a dotted module name belongs to; None for the package's
    `__init__` (the public surface imports everything)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _imports(path: Path, module: str) -> set[str]:
    """Every schedmoe module `path` imports, at module level or inside functions, except
    under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("schedmoe"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("schedmoe"):
                found.add(target)
                for alias in node.names:  # `from . import link`: a submodule
                    candidate = target + "." + alias.name
                    if _path(candidate) is not None:
                        found.add(candidate)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _path(module: str) -> Path | None:
    rel = Path(*module.split(".")[1:])
    for candidate in (PACKAGE / rel.with_suffix(".py"), PACKAGE / rel / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _edges() -> dict[str, dict[str, set[str]]]:
    """unit -> imported unit -> the modules that make the edge."""
    edges: dict[str, dict[str, set[str]]] = {}
    for module, path in _modules().items():
        unit = _unit(module)
        if unit is None:
            continue
        for target in _imports(path, module):
            other = _unit(target)
            if other is not None and other != unit:
                edges.setdefault(unit, {}).setdefault(other, set()).add(f"{module} -> {target}")
    return edges


def _declared(unit: str) -> set[str] | None:
    """What a folder's `__init__.py` docstring says it may import (None: anything)."""
    if unit in ROOT_MAY_IMPORT:
        return ROOT_MAY_IMPORT[unit]
    doc = ast.get_docstring(ast.parse((PACKAGE / unit / "__init__.py").read_text())) or ""
    assert "May import" in doc or "may import" in doc, f"{unit}/__init__.py: no 'May import'"
    if "May import anything" in doc:
        return None
    text = doc[doc.index("May import"):].split(".\n")[0].split(". ")[0]
    return {token.strip("`/") for token in text.split("`")[1::2]}


def test_every_unit_imports_only_what_it_declares():
    for unit, targets in _edges().items():
        allowed = _declared(unit)
        if allowed is None:
            continue
        undeclared = {t: sorted(why) for t, why in targets.items() if t not in allowed}
        assert not undeclared, f"{unit} imports what its docstring does not list: {undeclared}"


def test_lower_layers_never_import_higher_ones():
    level = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
    units = {_unit(m) for m in _modules()} - {None}
    assert units == set(level), f"units without a layer: {units - set(level)}"
    for unit, targets in _edges().items():
        for target, why in targets.items():
            assert level[target] <= level[unit], f"{unit} imports higher {target}: {sorted(why)}"


def test_no_cycle_between_folders():
    edges = _edges()
    state: dict[str, int] = {}

    def visit(unit: str, path: list[str]) -> None:
        state[unit] = 1
        for target in edges.get(unit, {}):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle between folders: " + " -> ".join(cycle))
            if state.get(target) is None:
                visit(target, path + [target])
        state[unit] = 2

    for unit in list(edges):
        if unit not in state:
            visit(unit, [unit])


def test_the_graph_sees_function_level_imports():
    """The parser counts an import inside a function (so a cycle dodged that way fails)."""
    found = _imports(PACKAGE / "schedulers" / "adaptive.py", "schedmoe.schedulers.adaptive")
    assert "schedmoe.sim" in found or "schedmoe.sim.timeline" in found


HEAVY = ["torch.distributed.checkpoint", "torch.distributed.fsdp", "numba", "zstandard",
         "matplotlib", "tqdm", "transformers", "schedmoe.sim", "schedmoe.tools"]


def test_import_schedmoe_is_light():
    """None of HEAVY loads with `import schedmoe` beyond what `import torch` loads itself."""
    code = ("import sys, torch; before = set(sys.modules); import schedmoe; "
            "print('\\n'.join(sorted(set(sys.modules) - before)))")
    new = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    loaded = [m for m in new for heavy in HEAVY if m == heavy or m.startswith(heavy + ".")]
    assert not loaded, f"import schedmoe loaded {loaded}"


def test_the_features_still_load_what_they_need():
    code = ("import sys, schedmoe, schedmoe.parallel as p; p.save_checkpoint; "
            "schedmoe.MoELayer(8, 4, 16, compressor='zstd'); "
            "print('torch.distributed.checkpoint' in sys.modules, 'zstandard' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    assert out == ["True", "True"]


def test_the_root_holds_init_and_at_most_three_modules():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert "__init__.py" in modules and len(modules) <= 4, modules
