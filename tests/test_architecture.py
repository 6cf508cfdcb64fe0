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
# torch-free leaves `environment` and `__init__` (lazy). The task kinds sit between the data
# (whose generic readers they use) and the model (which asks them for its head).
LAYERS = {"core": 0, "store": 1, "data": 2, "tasks": 3, "model": 4, "engine": 5, "studies": 6}
TOP = 7
# The built-in task kinds: a comparison with one of them is a branch on the kind.
TASK_KINDS = {"text", "image", "multiple-choice"}
PURE = [
    "fedhello.core.config", "fedhello.core.layers", "fedhello.core.budgets",
    "fedhello.core.allocation", "fedhello.core.aggregation", "fedhello.core.profile",
    "fedhello.core.schedule", "fedhello.core.seeds", "fedhello.core.numerics",
    "fedhello.store.runs", "fedhello.store.checkpoint", "fedhello.planner", "fedhello.tasks",
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


def _kind_branches(root: Path) -> list[str]:
    """``file:line`` of every comparison with a task kind's name (``kind == "image"``, ``task
    in ("text", "multiple-choice")``, ``match`` cases), every choice between kinds (``"image"
    if vision else "text"``) and every table keyed by kind names."""

    def kinds(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in TASK_KINDS
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(kinds(e) for e in node.elts)
        return False

    found: list[tuple[str, int]] = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                hit = any(kinds(n) for n in (node.left, *node.comparators))
            elif isinstance(node, ast.MatchValue):
                hit = kinds(node.value)
            elif isinstance(node, ast.IfExp):
                hit = kinds(node.body) or kinds(node.orelse)
            elif isinstance(node, ast.Dict):
                hit = any(k is not None and kinds(k) for k in node.keys)
            else:
                continue
            if hit:
                found.append((str(path.relative_to(root)), node.lineno))
    return [f"{path}:{line}" for path, line in sorted(found)]


def test_task_kinds_are_branched_on_only_in_their_modules() -> None:
    """What differs between task kinds lives in ``fedhello/tasks/``: elsewhere the code asks
    the task, never compares a kind's name."""
    outside = [f for f in _kind_branches(SRC) if not f.startswith("tasks/")]
    assert not outside, outside


def test_the_kind_branch_check_finds_branches(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text(
        'if kind == "image":\n    pass\nok = task in ("text", "multiple-choice")\n'
        'HEADS = {"text": 1}\nmatch kind:\n    case "image":\n        pass\n'
        'name = "text"\nif name != "auto":\n    pass\nt = "image" if v else "text"\n'
    )
    assert _kind_branches(tmp_path) == ["m.py:1", "m.py:3", "m.py:4", "m.py:6", "m.py:11"]


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
        if path.relative_to(SRC).parts[0] == "cli":  # the command: it owns the process
            continue
        text = path.read_text()
        if "logging.basicConfig" in text or "os.environ[" in text or "set_num_threads" in text:
            offenders.append(str(path.relative_to(SRC)))
    # api.py sets run.threads for the call and restores it (test_engine checks); the ClientApp
    # and the deployed ServerApp own their Flower processes, so they may set their threads;
    # model/determinism.py is the function a process's entry point calls to set its
    # deterministic mode (no library code calls it)
    expected = [
        "api.py", "engine/flower/client_app.py", "engine/flower/server_app.py",
        "model/determinism.py",
    ]  # fmt: skip
    assert sorted(offenders) == expected, offenders


# A method's client side is a hook (fedhello.model.hooks), so the one training loop names none.
METHOD_WORDS = ("hetlora", "flexlora", "fedra", "ffa", "pruning", "tailnorm", "subnetwork")
GENERIC_TASK_FIELDS = {"client", "round", "spec", "lr", "seed", "hooks"}


def test_the_training_loop_imports_and_names_no_method() -> None:
    """``model/training.py`` imports no strategy module, no hook implementation and not FedRA's
    subnetwork; it names no method, and its ``LocalTask`` has no per-method field (a method's
    client side is a hook, declared by the strategy and named in ``LocalTask.hooks``)."""
    path = SRC / "model" / "training.py"
    tree = ast.parse(path.read_text())
    hook_parts = {"fedhello.model.hooks", "fedhello.model.hooks.base"}
    wrong = [
        m
        for m in _imports(path)
        if m.startswith(("fedhello.core.allocation", "fedhello.model.subnetwork"))
        or (m.startswith("fedhello.model.hooks.") and m not in hook_parts)
    ]
    assert not wrong, f"model/training.py imports method modules: {wrong}"
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
              for a in n.names}  # fmt: skip
    named = sorted(n for n in names if any(w in n.lower() for w in METHOD_WORDS))
    assert not named, f"model/training.py names methods: {named}"
    task = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LocalTask")
    fields = {s.target.id for s in task.body
              if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}  # fmt: skip
    assert fields <= GENERIC_TASK_FIELDS, (
        f"LocalTask's per-method fields: {fields - GENERIC_TASK_FIELDS}"
    )
