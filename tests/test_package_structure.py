"""The package's shape: no import cycles (function-level imports included), one version number, no test fixtures
or dead code in production."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "daam_core"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (relative and absolute imports)."""
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for candidate in [target] + [f"{target}.{a.name}" for a in node.names]:
                if candidate in modules and candidate != name:
                    deps.add(candidate)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (a package importing its own modules is no cycle)."""
    def related(a, b):
        return a.startswith(b + ".") or b.startswith(a + ".")

    g = {m: {d for d in deps if not related(m, d)} for m, deps in graph.items()}
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
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
                found.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_in_the_package():
    graph = import_graph()
    assert "daam_core.hosts.diffusers.adapter" in graph["daam_core.hosts.diffusers.joint"]  # the graph is real
    assert cycles(graph) == []


def test_one_version_number():
    import daam_core

    text = (REPO / "pyproject.toml").read_text()
    (declared,) = re.findall(r'^version\s*=\s*"([^"]+)"', text, re.M)
    assert daam_core.__version__ == declared
    assert not re.search(r'__version__\s*=\s*"', (PKG / "__init__.py").read_text())  # not written a second time


def test_no_test_fixtures_or_dead_code_in_production():
    code = ("import daam_core.engine.geometry as g, daam_core.hosts.comfy.tokens as t, daam_core.text.sentencepiece as s,"
            " importlib.util as u, json\n"
            "print(json.dumps([hasattr(g, 'KINDS'), hasattr(g, 'PARTS'),"
            " hasattr(t, 'layout_from_comfy_sd3'), hasattr(s, 'tokenize_sd3'),"
            " u.find_spec('daam_core.hosts.diffusers.tiny') is not None]))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[false, false, false, false, false]"
    production = "\n".join(p.read_text() for p in PKG.rglob("*.py"))
    for name in ("tiny_sdxl_pipeline", "tiny_sd3_pipeline", "tiny_flux_pipeline"):
        assert name not in production
