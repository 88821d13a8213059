"""The README's layer picture, checked: every include and import points down.

C++ layers are directories of cc/; Python layers are modules of jax_efa_moe/. A file may use
its own layer (C++) and the layers below it; a new directory or module must be placed here.
"""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Bottom up. transfer_engine and kernels share a level: neither may use the other.
CC_LEVELS = {"base": 0, "transfer_engine": 1, "kernels": 1, "a2a": 2, "ffi": 3, "python": 4}

PY_LEVELS = {
    "_jem": 0,
    "config": 1, "bootstrap": 1, "providers": 1, "per_rank": 1, "launch": 1, "timing": 1,
    "ops": 2, "cpu_contexts": 2, "cuda_contexts": 2,
    "autodiff": 3,
    "api": 4,
    "reference": 5, "moe": 5,
    "__init__": 6,
}


def test_cc_includes_point_down():
    upward = []
    for path in sorted((ROOT / "cc").rglob("*")):
        if path.suffix not in (".h", ".cc", ".cu", ".cuh"):
            continue
        layer = path.relative_to(ROOT / "cc").parts[0]
        assert layer in CC_LEVELS, f"{path}: layer {layer} has no level in this test"
        for used in re.findall(r'#include "cc/([a-z0-9_]+)/', path.read_text()):
            if used != layer and CC_LEVELS[used] >= CC_LEVELS[layer]:
                upward.append(f"{path.relative_to(ROOT)} includes cc/{used}/")
    assert not upward, "includes that do not point down:\n" + "\n".join(upward)


def test_python_imports_point_down():
    upward = []
    for path in sorted((ROOT / "jax_efa_moe").glob("*.py")):
        module = path.stem
        assert module in PY_LEVELS, f"{path}: module {module} has no level in this test"
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or node.module is None:
                continue
            used = []
            if node.module == "jax_efa_moe":
                used = [a.name for a in node.names]
            elif node.module.startswith("jax_efa_moe."):
                used = [node.module.split(".")[1]]
            for name in used:
                if PY_LEVELS[name] >= PY_LEVELS[module]:
                    upward.append(f"jax_efa_moe/{path.name} imports {name}")
    assert not upward, "imports that do not point down:\n" + "\n".join(upward)
