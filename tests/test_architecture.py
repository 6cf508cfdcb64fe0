"""The shape of the package: the pure core imports no torch, imports only go downward, and the
front door is lazy. Checked on the source (ast) and in fresh interpreters."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "fedhello"

# Layer of each top-level part (lower imports nothing higher). Modules at the top of the
# package are above everything (the front door, the CLI and their helpers), except the two
# torch-free leaves `environment` and `__init__` (lazy).
LAYERS = {"core": 0, "store": 1, "data": 2, "model": 3, "engine": 4, "studies": 5}
TOP = 6
PURE = [
    "fedhello.core.config", "fedhello.core.layers", "fedhello.core.budgets",
    "fedhello.core.allocation", "fedhello.core.aggregation", "fedhello.core.costmodel",
    "fedhello.core.schedule", "fedhello.core.seeds", "fedhello.store.runs",
    "fedhello.store.checkpoint", "fedhello.planner",
]  # fmt: skip


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else parts[-1]


def _layer(module: str) -> int:
    return LAYERS.get(_part(module), TOP)


def _imports(path: Path) -> list[str]:
    """Every fedhello module ``path`` imports, at the top or inside a function."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedhello"):
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("fedhello")]
    return out


def test_imports_only_go_downward() -> None:
    wrong = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        if module in ("fedhello", "fedhello.environment"):
            continue
        for target in _imports(path):
            if target == "fedhello.environment":
                continue
            if _layer(target) > _layer(module):
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


def test_flower_code_lives_only_in_its_engine_folder() -> None:
    outside = [
        str(p.relative_to(SRC))
        for p in SRC.rglob("*.py")
        if "engine/flower" not in p.as_posix()
        and any(n == "flwr" or n.startswith("flwr.") for n in _third_party(p))
    ]
    assert not outside, outside


def _third_party(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def _fresh(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize("module", PURE)
def test_pure_logic_imports_neither_torch_nor_transformers(module: str) -> None:
    loaded = _fresh(
        f"import sys, {module}; print(sorted(m for m in ('torch', 'transformers', 'peft', "
        "'flwr') if m in sys.modules))"
    )
    assert loaded == "[]", f"{module} imports {loaded}"


def test_the_front_door_is_lazy_and_complete() -> None:
    assert _fresh("import fedhello, sys; print('torch' in sys.modules)") == "False"
    names = _fresh(
        "import fedhello; print(' '.join(n for n in fedhello.__all__ "
        "if getattr(fedhello, n, None) is None))"
    )
    assert names == ""  # every advertised name resolves
    assert (
        _fresh(
            "import fedhello, sys; fedhello.build_strategy; fedhello.load_config; "
            "print('torch' in sys.modules)"
        )
        == "False"
    )


def test_library_modules_log_through_their_own_logger() -> None:
    """No library module configures logging or prints; the CLI alone owns output."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name in ("cli.py",):
            continue
        text = path.read_text()
        if "logging.basicConfig" in text or "os.environ[" in text or "set_num_threads" in text:
            offenders.append(str(path.relative_to(SRC)))
    # api.py sets run.threads for the call and restores it (test_engine checks); the ClientApp
    # owns its Flower process, so it may set that process's threads
    assert offenders == ["api.py", "engine/flower/client_app.py"], offenders
