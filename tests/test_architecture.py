"""The package's shape: imports point down the layers, no import cycles, a light top-level import.

Every import is read from the source with ``ast``, at any depth (module level,
inside functions, under ``TYPE_CHECKING``), so a cycle or an upward import
cannot hide in a function body.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_kvcache_plugin"
NAME = PACKAGE.name

# Bottom to top: a unit may import only units of a lower rank (and itself).
RANKS = {
    "errors": 0,
    "quantization": 0,
    "embedded": 0,  # the shipped default model: data and its path, imports nothing of ours
    "quantizers": 1,
    "config": 1,
    "_compat": 1,
    "token_clock": 1,
    "snapshot_file": 1,
    "block_tensors": 1.5,  # concatenating, slicing and cutting block tensors into parts
    "blocks": 2,
    "layer_inputs": 0,
    "layer_settings": 3,
    "residual_window": 0,  # the exact window of a layer (a mixin): only torch
    "layer": 4,
    "static_layer": 4,  # fixed-shape buffers for torch.compile, beside `layer`
    "sliding_layer": 5,
    "cache_io": 5.5,  # snapshots of both layer kinds
    "budget": 5,
    "padding": 5,  # a left-padded batch's sinks under drops: only torch
    "shrink": 6,
    "cache_budget": 6.5,  # the budget half of QuantizedKVCache (a mixin over shrink and padding)
    "attention": 6,
    "cache": 7,
    "static_cache": 7.5,  # the fixed-shape cache generate compiles, over `cache`'s model layout
    "encoder_decoder": 8,
    "generate_recipe": 9,
    "recipe": 10,
    "reuse": 8,
    "resilience": 9,
    "distributed": 10,
    "evaluation": 11,
    "integrations": 11,  # serving engines beside transformers (vLLM), over reuse
    "app": 12,
    "serving": 13,  # compatibility re-export of resilience + app
    "__main__": 13,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of this package that ``name`` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import sub` imports the submodule when there is one
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_unit_has_a_rank():
    units = {_unit(m) for m in _modules()} - {""}
    assert units <= set(RANKS), f"units without a layer rank: {sorted(units - set(RANKS))}"


def test_no_import_cycles_between_modules():
    assert _cycles(_graph()) == []


def test_no_import_cycles_between_folders():
    graph: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        if _unit(module):
            graph.setdefault(_unit(module), set()).update(_unit(t) for t in targets if _unit(t) != _unit(module))
    assert _cycles(graph) == []


def _upward(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in graph.items():
        unit = _unit(module)
        if not unit:
            continue  # the top-level __init__ is the façade over every layer
        for target in targets:
            other = _unit(target)
            if other and other != unit and RANKS[other] >= RANKS[unit]:
                found.append(f"{module} -> {target}")
    return found


def test_imports_point_down_the_layers():
    assert _upward(_graph()) == []


def test_the_checks_catch_a_cycle_and_an_upward_import():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _upward({f"{NAME}.cache": {f"{NAME}.reuse.hook", f"{NAME}.layer"}}) == [
        f"{NAME}.cache -> {NAME}.reuse.hook"
    ]
    # relative, function-level and `from pkg import submodule` imports are all seen
    assert _imports(f"{NAME}.blocks", PACKAGE / "blocks.py", set(_modules())) == {f"{NAME}.block_tensors", f"{NAME}.quantization"}
    assert f"{NAME}.distributed.launch" in _graph()[f"{NAME}.app.service"]


def test_no_module_is_a_sprawl():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}


def test_importing_the_package_leaves_serving_and_cluster_code_unloaded():
    heavy = ["prometheus_client", "pybreaker", f"{NAME}.resilience", f"{NAME}.distributed", f"{NAME}.app"]
    code = f"import sys, {NAME}; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_lazy_names_resolve_and_every_public_name_is_listed():
    import hf_kvcache_plugin

    for name in hf_kvcache_plugin.__all__:
        assert getattr(hf_kvcache_plugin, name) is not None
    assert set(hf_kvcache_plugin._LAZY) <= set(hf_kvcache_plugin.__all__)
    with pytest.raises(AttributeError, match="no attribute 'NotAName'"):
        hf_kvcache_plugin.NotAName  # noqa: B018
