"""The package layout keeps its promises: the engine imports only its own libraries, hosts load lazily."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "daam_core"
ENGINE_LIBRARIES = {"torch", "numpy", "cv2", "safetensors"}  # safetensors: the trace file format, in io.py
# Optional imports, each in one module and only inside a try (the engine runs without them): Triton ships with
# PyTorch's CUDA wheels and compiles the recording kernel.
OPTIONAL_LIBRARIES = {"kernels.py": {"triton"}}


def top_level_imports(path: Path) -> set[str]:
    """Absolute top-level modules a file imports (relative imports excluded)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def relative_imports(path: Path) -> set[str]:
    """Modules a file imports relatively, as written (``..text.layout`` -> ``..text.layout``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            out.add("." * node.level + (node.module or ""))
    return out


def unguarded_imports(path: Path) -> set[str]:
    """Top-level packages imported outside any ``try`` block."""
    guarded = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            for inner in node.body:
                for sub in ast.walk(inner):
                    guarded.add(id(sub))
    out = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_engine_and_text_import_only_torch_numpy_opencv():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for folder in ("engine", "text"):
        for path in sorted((PKG / folder).glob("*.py")):
            optional = OPTIONAL_LIBRARIES.get(path.name, set()) if folder == "engine" else set()
            extra = top_level_imports(path) - stdlib - ENGINE_LIBRARIES - optional
            assert not extra, f"{path.relative_to(REPO)} imports {sorted(extra)}"
            for lib in optional & top_level_imports(path):
                assert lib not in unguarded_imports(path), f"{path.relative_to(REPO)} imports {lib} outside a try"
            up = [m for m in relative_imports(path) if m.startswith("..") and not m.startswith(("..text", "..engine"))]
            assert not up, f"{path.relative_to(REPO)} reaches outside the engine: {up}"


def test_io_does_not_import_the_trace():
    assert not any("trace" in m for m in relative_imports(PKG / "engine" / "io.py"))


def test_import_daam_core_loads_no_host_model_library_or_shapes_model():
    code = (
        "import json, sys, daam_core\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers', 'comfy')"
        " or m.startswith(('daam_core.hosts', 'daam_core.shapes', 'daam_core.cli')))\n"
        "import types\n"
        "print(json.dumps({'loaded': loaded, 'trace_is_function': isinstance(daam_core.trace, types.FunctionType),"
        " 'after': sorted(m for m in sys.modules if m.startswith('daam_core.hosts.diffusers'))}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["loaded"] == []
    assert result["trace_is_function"] and "daam_core.hosts.diffusers.adapter" in result["after"]


def test_no_public_name_shadows_a_module():
    import daam_core

    modules = {p.stem for p in PKG.glob("*.py")} | {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()}
    clashes = [name for name in daam_core.__all__ if name in modules]
    assert not clashes, f"daam_core.{clashes} names both a module and an object"
