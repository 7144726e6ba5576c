"""The package's import contract: every import -- at module level or inside a function -- goes
down this order, so data flows input -> layer -> ops -> backends -> kernels with nothing calling
upward. A new module gets its place here (the test fails for a module it does not know)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: lowest first; a module may import only modules listed before it
ORDER = [
    "ztriton._checks", "ztriton.boundary", "ztriton.counting", "ztriton.sparse", "ztriton.native",
    "ztriton.kernels.time_filter", "ztriton.kernels.lif_forward", "ztriton.kernels.event_current",
    "ztriton.kernels.sparse_weight_grad", "ztriton.kernels.event_weight_grad", "ztriton.kernels.sparse_input_grad",
    "ztriton.kernels.lif_family_forward", "ztriton.kernels.lif_adjoint", "ztriton.kernels",
    "ztriton.rng", "ztriton.distributions", "ztriton.events", "ztriton.data", "ztriton.functional",
    "ztriton.interop.surrogates", "ztriton.scheduler",
    "ztriton.backends.base", "ztriton.backends.registry", "ztriton.backends.time_filter",
    "ztriton.backends.lif_forward", "ztriton.backends.weight_grad", "ztriton.backends.input_grad",
    "ztriton.backends.lif_family", "ztriton.backends.torch_backend", "ztriton.backends.native_backend",
    "ztriton.backends.triton_backend", "ztriton.backends",
    "ztriton.ops.common", "ztriton.ops.leaky_readout", "ztriton.ops.lif_linear", "ztriton.ops.lif_family",
    "ztriton.ops",
    "ztriton.layers", "ztriton.init", "ztriton.interop.nir", "ztriton.interop", "ztriton.calibration",
    "ztriton.bptt", "ztriton.train", "ztriton.compare", "ztriton.cli", "ztriton.__main__", "ztriton",
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "kernels":  # installed as ztriton.kernels (pyproject's package-dir)
        parts = ["ztriton"] + parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """The ztriton modules `path` imports anywhere in its code (relative or absolute)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
            if node.module:
                found.add(f"{base}.{node.module}")
            else:
                found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ztriton"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("ztriton"))
    return found


def _graph() -> dict[str, set[str]]:
    files = sorted((ROOT / "ztriton").rglob("*.py")) + sorted((ROOT / "kernels").glob("*.py"))
    return {_module_name(path): _imports(path, _module_name(path)) for path in files}


def test_every_module_has_a_place_in_the_order():
    assert sorted(set(_graph()) - set(ORDER)) == []
    assert sorted(set(ORDER) - set(_graph())) == []


def test_no_module_imports_upward():
    rank = {name: i for i, name in enumerate(ORDER)}
    upward = sorted(f"{source} imports {target}" for source, targets in _graph().items() for target in targets
                    if target in rank and rank[target] >= rank[source])
    assert upward == []


def test_the_check_sees_lazy_imports(tmp_path):
    """An import inside a function counts: the contract is about calls, not import time."""
    module = tmp_path / "native.py"
    module.write_text("import torch\n\n\ndef late():\n    from .layers import SparseLIFLinear\n    import ztriton.train\n")
    assert _imports(module, "ztriton.native") == {"ztriton.layers", "ztriton.train"}
