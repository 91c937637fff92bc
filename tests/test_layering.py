"""The package layering of docs/design.md ("Layers"), checked on the source.

Walks the AST of every module of ``pluglm`` and ``pluglm_kernels`` (module-level and
function-level imports alike: a lazy import defers a dependency, it does not remove it) and
fails on an import that goes up a layer, on ``pluglm_kernels`` importing ``pluglm``, and on
a cycle between the package's modules. Then checks, in fresh interpreters, that the
torch-only layers really import without transformers.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module belongs to the layer of the longest prefix naming it; it may import
# modules of its own layer (without a cycle) and of the layers below, never above.
LAYERS = (
    ("kernels", ("pluglm_kernels",)),
    ("foundation", ("pluglm._version", "pluglm._io", "pluglm.topk")),
    ("nn", ("pluglm.nn",)),
    ("search", ("pluglm.index", "pluglm.distributed")),
    ("memory", ("pluglm.memory", "pluglm.sharded_memory", "pluglm.encoders", "pluglm.safe_save")),
    ("model", ("pluglm.configuration_pluglm", "pluglm.modeling_pluglm", "pluglm.integrations",
               "pluglm.refresh", "pluglm.auto", "pluglm.convert", "pluglm.training")),
    ("apps", ("pluglm.bench", "pluglm.cli")),
    ("facade", ("pluglm",)),  # the package root (this module only): lazy re-exports
)
FACADE = len(LAYERS) - 1

# Import edges that close a cycle on purpose, each lazy (inside a function) and with its reason.
ALLOWED_CYCLE_EDGES = {
    ("pluglm.memory.store", "pluglm.sharded_memory"):
        "KnowledgeMemory.shard() is the public way to make a shard, and a shard wraps a "
        "KnowledgeMemory; the import is lazy, so there is no import-time cycle",
    ("pluglm.bench.large", "pluglm.cli"):
        "bench --large measures int8 recall on the demo's real corpus (Python's own "
        "documentation); the import is lazy, inside that case",
}


def _modules() -> dict[str, Path]:
    out = {}
    for top in ("pluglm", "pluglm_kernels"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or (i != FACADE and module.startswith(p + "."))) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{module} is in no layer: add it to LAYERS (and docs/design.md)"
    return rank


def _package(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _targets(module: str, node: ast.AST) -> list[str]:
    """The package modules an import statement loads (a name imported from a package is the
    package itself, unless it is a submodule)."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = _package(module)
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = f"{base}.{node.module}" if node.module else base
        else:
            base = node.module
        subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
        # "from . import _io" loads the submodule; names that are not submodules come from
        # the package itself
        names = subs + ([base] if len(subs) < len(node.names) else [])
    out = []
    for name in names:
        while name and name not in MODULES:  # "pluglm_kernels.functional.x" -> the module
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
    return out


def _edges() -> dict[tuple[str, str], int]:
    """(importer, imported) -> line of the first such import."""
    edges: dict[tuple[str, str], int] = {}
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _targets(module, node):
                # importing a.b.c runs a.b's __init__ first (unless the importer lives in a.b)
                chain = [target]
                parent = target.rpartition(".")[0]
                while parent and parent not in ("pluglm", "pluglm_kernels"):
                    if not module.startswith(parent + ".") and parent in MODULES:
                        chain.append(parent)
                    parent = parent.rpartition(".")[0]
                for t in chain:
                    if t != module:
                        edges.setdefault((module, t), node.lineno)
    return edges


EDGES = _edges()


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_no_upward_import():
    bad = [f"{a} (layer {LAYERS[_layer(a)][0]}) imports {b} (layer {LAYERS[_layer(b)][0]}) "
           f"at {MODULES[a].relative_to(ROOT)}:{line}"
           for (a, b), line in sorted(EDGES.items()) if _layer(b) > _layer(a)]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_kernels_never_import_pluglm():
    bad = [f"{a} imports {b}" for (a, b) in EDGES
           if a.startswith("pluglm_kernels") and not b.startswith("pluglm_kernels")]
    assert not bad, bad


def test_no_import_cycle():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for (a, b) in EDGES:
        if (a, b) not in ALLOWED_CYCLE_EDGES:
            graph[a].add(b)
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_allowed_cycle_edges_still_exist():
    """An allowance whose import is gone must go too (it would silently allow a new one)."""
    for edge in ALLOWED_CYCLE_EDGES:
        assert edge in EDGES, f"{edge} is allowed but no longer imported: remove it"


def test_no_private_names_imported():
    """A name with a leading underscore stays in its module: what another module needs gets a
    public name. (Private modules such as ``pluglm._io`` may be imported within their own
    top-level package; ``pluglm`` never imports a private module of ``pluglm_kernels``.)"""
    bad = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            top = module.split(".")[0]
            for t in _targets(module, node):
                if t.split(".")[0] != top and any(p.startswith("_") for p in t.split(".")[1:]):
                    bad.append(f"{module}:{node.lineno} imports private module {t}")
            if isinstance(node, ast.ImportFrom):
                bad += [f"{module}:{node.lineno} imports private name {a.name}" for a in node.names
                        if a.name.startswith("_") and a.name != "__version__"
                        and not any(t.endswith("." + a.name) for t in _targets(module, node))]
    assert not bad, "\n".join(bad)


def _run(code: str) -> None:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("module", ["pluglm", "pluglm.nn", "pluglm.memory", "pluglm.index",
                                    "pluglm.refresh", "pluglm.integrations", "pluglm_kernels"])
def test_torch_only_layers_import_without_transformers(module):
    code = (f"import sys, {module}\n"
            "bad = sorted(m for m in ('transformers', 'faiss', 'rich', 'pluglm.modeling_pluglm') "
            "if m in sys.modules)\n"
            "assert not bad, bad\n")
    _run(code)


def test_root_names_resolve_and_register_the_auto_classes():
    code = ("import sys, pluglm\n"
            "assert 'transformers' not in sys.modules\n"
            "assert pluglm.KnowledgeMemory.__module__ == 'pluglm.memory.store'\n"
            "assert 'transformers' not in sys.modules\n"
            "from pluglm import PlugLMForMaskedLM, PlugLMConfig\n"
            "from transformers import AutoConfig, AutoModelForMaskedLM\n"
            "cfg = AutoConfig.for_model('pluglm', vocab_size=50, hidden_size=16, num_hidden_layers=1,"
            " num_attention_heads=2, intermediate_size=16, key_dim=8, max_position_embeddings=16,"
            " doc_max_length=8)\n"
            "assert isinstance(cfg, PlugLMConfig)\n"
            "assert type(AutoModelForMaskedLM.from_config(cfg)) is PlugLMForMaskedLM\n"
            "assert sorted(pluglm.__all__) == sorted(n for n in dir(pluglm) if n in pluglm.__all__)\n"
            "import pluglm.nn as nn_; assert pluglm.nn is nn_\n")
    _run(code)
