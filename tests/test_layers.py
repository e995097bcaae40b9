"""The code's shape: one-way layers, no import circles, no private names across files.

Every module's imports are read with ``ast`` (function-level ones and ``import_module("...")`` calls
included) and checked against :data:`LAYERS`, the one declaration of the layer order. A module
belongs to the group with the longest matching prefix; it may import its own group and any group
on a lower floor, never a sibling on its own floor or anything above it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dbrxq", "quantize", "calibration")

# Floors, bottom first. Groups on one floor are siblings and do not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("dbrxq.core",),                    # errors, hostile-input checks, pages, machine, units, files
    ("dbrxq.model",),                   # the architecture: config, KV cache, MoE, the model
    ("dbrxq.formats", "dbrxq.text"),    # checkpoints on disk and the hub; the tokenizer
    ("quantize",),                      # quantization math, kernels, quantized modules, the format
    ("calibration", "dbrxq.plan"),      # the calibrated pipeline; memory placement plans
    ("dbrxq.runtime",),                 # generation, evaluation, the offloading runtime
    ("dbrxq.loading",),                 # assembling a model from a checkpoint (and its offloading)
    ("dbrxq.serve", "dbrxq.export"),    # the OpenAI server; GGUF export
    ("dbrxq.api",),                     # the Python API
    ("dbrxq",),                         # the package face (dbrxq/__init__.py): public names, loaded on first use
    ("dbrxq.cli",),                     # the command line
]
MAX_LINES = 600  # a file one can read in a sitting (the C kernel is one unit and is not Python)
# Third-party packages a module may import inside a function, on first use: heavy, and optional to
# most paths (`dbrxq run` never needs the HTTP stack, the GGUF writer or bitsandbytes).
LAZY_OK = ("fastapi", "uvicorn", "pydantic", "gguf", "triton", "bitsandbytes")


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((root / pkg).rglob("*.py")):
            name = ".".join(p.relative_to(root).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = p
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The project module an import of ``name`` (a module or module.attribute) loads, or None."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(path: Path, me: str, known: dict[str, Path]) -> list[dict]:
    """Every import in ``path``: the module it loads, the names it takes, and whether it sits at the
    module's top level (inside ``if``/``try`` at the top counts as the top)."""
    tree = ast.parse(path.read_text(), str(path))
    top = set()
    for node in tree.body:
        top.update(id(n) for n in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                          ast.ClassDef)))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import module` loads the module; `from module import name` the module
            targets = [(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base, [a.name]) for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            targets = [(node.args[0].value, [])]
        else:
            continue
        for target, names in targets:
            found.append({"line": node.lineno, "target": target, "module": _resolve(target, known),
                          "names": names, "top": id(node) in top})
    return found


def group_of(module: str) -> tuple[int, str]:
    """(floor, group) of a project module: the longest group prefix that matches."""
    best = None
    for floor, groups in enumerate(LAYERS):
        for g in groups:
            if (module == g or module.startswith(g + ".")) and (best is None or len(g) > len(best[1])):
                best = (floor, g)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def check(root: Path = ROOT) -> list[str]:
    """Every way the tree breaks the rules, one line each."""
    known = modules(root)
    graph: dict[str, set[str]] = {m: set() for m in known}
    problems = []
    for me, path in known.items():
        rel = path.relative_to(root)
        if len(path.read_text().splitlines()) > MAX_LINES:
            problems.append(f"{rel}: over {MAX_LINES} lines")
        floor, group = group_of(me)
        for imp in imports(path, me, known):
            if imp["module"] is None:
                if not imp["top"] and not imp["target"].split(".")[0] in LAZY_OK + ("importlib",) \
                        and imp["target"].split(".")[0] in PACKAGES:
                    problems.append(f"{rel}:{imp['line']}: {imp['target']} is not a module of this project")
                continue
            target = imp["module"]
            if target == me:
                continue
            graph[me].add(target)
            t_floor, t_group = group_of(target)
            if t_group != group and t_floor >= floor:
                kind = "a sibling" if t_floor == floor else "a layer above"
                problems.append(f"{rel}:{imp['line']}: imports {target}, {kind} ({t_group} on floor {t_floor}; "
                                f"{me} is {group} on floor {floor})")
            if not imp["top"] and me != "dbrxq":  # the package face loads its public names on first use
                problems.append(f"{rel}:{imp['line']}: imports {target} inside a function; imports go at the top")
            for name in imp["names"]:
                if name.startswith("_") and f"{target}.{name}" not in known:
                    problems.append(f"{rel}:{imp['line']}: takes the private name {name} from {target}")
    for comp in circles(graph):
        problems.append(f"import circle among {len(comp)} modules, e.g. " + " -> ".join(cycle_through(graph, comp)))
    return problems


def cycle_through(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A shortest import path from the component's first module back to itself, along real imports."""
    inside, start = set(comp), comp[0]
    came: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ()) & inside):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came[path[-1]])
                    return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, start]
                if w not in came:
                    came[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_layers_point_one_way():
    problems = check()
    assert not problems, "\n".join(problems)


def test_every_module_has_a_layer():
    for m in modules():
        group_of(m)


@pytest.mark.parametrize("where, source, expect", [
    ("dbrxq/model/bad.py", "from dbrxq.loading.loader import load_model\n", "a layer above"),
    ("dbrxq/formats/bad.py", "from dbrxq.text.tokenizer import DbrxTokenizer\n", "a sibling"),
    ("quantize/bad.py", "def f():\n    import calibration.pipeline\n", "inside a function"),
    ("dbrxq/core/bad.py", "from dbrxq.core.errors import _hidden\n", "private name _hidden"),
    ("dbrxq/core/bad.py", "import importlib\nimportlib.import_module('dbrxq.cli')\n", "a layer above"),
    ("dbrxq/core/bad.py", "x = 1\n" * (MAX_LINES + 1), "over 600 lines"),
])
def test_the_check_sees_each_kind_of_break(tmp_path, where, source, expect):
    """The rules can fail: a copy of the tree with one bad file added breaks exactly as expected."""
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            dst = tmp_path / p.relative_to(ROOT)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(p.read_text())
    (tmp_path / where).write_text(source)
    problems = check(tmp_path)
    assert problems and all("bad.py" in p for p in problems), problems
    assert any(expect in p for p in problems), problems


def test_a_circle_is_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]


if __name__ == "__main__":  # python tests/test_layers.py [ROOT]: the counts, and every break
    import sys
    root = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT
    known = modules(root)
    graph = {m: set() for m in known}
    statements = inside = 0
    for me, path in known.items():
        for imp in imports(path, me, known):
            if imp["module"] not in (None, me):
                statements += 1
                inside += not imp["top"]
                graph[me].add(imp["module"])
    sizes = sorted(((len(p.read_text().splitlines()), str(p.relative_to(root))) for p in known.values()), reverse=True)
    print(f"{len(known)} modules; {statements} project imports, {inside} inside functions; "
          f"{len(circles(graph))} import circles; largest file {sizes[0][1]} ({sizes[0][0]} lines)")
    problems = check(root)
    print(f"{len(problems)} breaks of the layer rules" + "".join(f"\n  {p}" for p in problems))
