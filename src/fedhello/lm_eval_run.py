"""``fedhello eval RUN --lm-eval TASKS``: a finished decoder run scored by EleutherAI's
lm-evaluation-harness (``lm-eval``, the optional extra ``fedhello[lm-eval]``), offline.

The harness scores a plain transformers folder, so the run's LoRA is merged first
(``fedhello.export``) into ``RUN/lm-eval/model``, kept there with the adapter's digest
(``model.json``) and reused while the adapter is unchanged: scoring other tasks later costs no
second merge, and ``lm_eval --model hf --model_args pretrained=RUN/lm-eval/model`` reruns any
result with the harness's own command. The price is a copy of the model's weights (fp32) in
the run folder.

Every evaluation also gets a ready task, ``fedhello_heldout`` (``RUN/lm-eval/tasks/``, written
once by ``fedhello.lm_eval_tasks``): the run's test split, whose words no client trained on,
scored by fedhello's own exact match and ROUGE-L. That folder is always on lm-eval's include
path; ``--include`` adds the user's folders.

The model runs on the run's ``train.device``, in fp32 weights under the autocast of the
precision the run trained in (lm-eval's ``mixed_precision_dtype``), as fedhello scored it.
lm-eval seeds Python's, NumPy's and torch's generators; their states are restored after.

Each request holds the BOS its model's own tokenizer or its text gives, once (``harness_model``):
lm-eval 0.4.13's ``hf`` model doubles it in two places, which ``lm_eval --model hf`` reruns keep.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from fedhello.core.errors import ConfigError, UserError
from fedhello.lm_eval_model import harness_model
from fedhello.lm_eval_tasks import write_heldout_task
from fedhello.store.runs import RunDir, finished_run

if TYPE_CHECKING:
    from fedhello.core.config import Config
    from fedhello.tasks import Task

logger = logging.getLogger(__name__)

EVAL_DIR = "lm-eval"  # inside the run folder
INSTALL = "pip install 'fedhello[lm-eval]'"
AUTOCAST = {"bf16": "bfloat16", "fp16": "float16"}  # the run's precision -> lm-eval's dtype


def eval_paths(run: RunDir) -> SimpleNamespace:
    base = run.path / EVAL_DIR
    return SimpleNamespace(base=base, model=base / "model", stamp=base / "model.json",
                           tasks=base / "tasks", results=base / "results.json")  # fmt: skip


def check_eval(run_path: Path, names: str, includes: list[str]) -> tuple[RunDir, Config, list[str]]:
    """(run, its config, task names): every refusal that needs no model, in one line each."""
    from fedhello.core.config import load_saved_config

    run = finished_run(run_path)
    cfg = load_saved_config(run.config_path)
    task = run_task(cfg)
    if not getattr(task, "generative", False):
        raise ConfigError(
            f"run {str(run_path)!r} trained model.task = {task.name!r}: lm-eval scores language "
            "models; allowed: a causal-lm run (a classifier's scores are in its summary.json; "
            "`fedhello export --merged` serves it)"
        )
    for folder in includes:
        if not Path(folder).is_dir():
            raise UserError(
                f"--include {folder!r} is not a folder; allowed: a folder of lm-eval task "
                "YAML files"
            )
    tasks = [t.strip() for t in names.split(",") if t.strip()]
    if not tasks:
        raise UserError(f"--lm-eval {names!r}: allowed: comma-separated lm-eval task names")
    lm_eval_version()
    return run, cfg, tasks


def run_task(cfg: Config) -> Task:
    """The task kind the run trained: ``model.task``, or what ``auto`` resolved to."""
    from fedhello.model.source import model_shape, resolve_model_source
    from fedhello.tasks import task_for

    source = resolve_model_source(cfg.model.name, cfg.model.allow_download)
    return task_for(model_shape(source, cfg.model.task)[0])


def lm_eval_version() -> str:
    try:
        import lm_eval
    except ImportError:
        raise UserError(f"lm-eval is not installed; allowed: install it with {INSTALL}") from None
    return str(lm_eval.__version__)


def adapter_digest(run: RunDir) -> str:
    """SHA-256 over the adapter folder's files (names and bytes): what the merge depends on."""
    h = hashlib.sha256()
    for f in sorted(p for p in run.adapter_dir.rglob("*") if p.is_file()):
        h.update(f.relative_to(run.adapter_dir).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def merged_model(run: RunDir) -> Path:
    """``RUN/lm-eval/model``: the run merged (``export_merged``), reused while the adapter is
    unchanged. Written beside the run and renamed in (same file system), so a crash leaves
    either the previous model or none, never half of one."""
    from fedhello.export import export_merged

    paths, digest = eval_paths(run), adapter_digest(run)
    stamp = json.loads(paths.stamp.read_text()) if paths.stamp.is_file() else {}
    if paths.model.is_dir() and stamp.get("adapter_sha256") == digest:
        logger.info("reusing the merged model in %s (adapter unchanged)", paths.model)
        return Path(paths.model)
    paths.base.mkdir(parents=True, exist_ok=True)
    parent = run.path.resolve().parent
    with tempfile.TemporaryDirectory(prefix=f".{run.path.name}-lm-eval-", dir=parent) as tmp:
        export_merged(run.path, Path(tmp) / "model")
        paths.stamp.unlink(missing_ok=True)
        shutil.rmtree(paths.model, ignore_errors=True)
        os.replace(Path(tmp) / "model", paths.model)
    logger.info("merged model in %s", paths.model)
    paths.stamp.write_text(json.dumps({"adapter_sha256": digest}) + "\n", encoding="utf-8")
    return Path(paths.model)


def task_manager(tasks: list[str], includes: list[Path]) -> Any:
    """lm-eval's TaskManager that knows every name in ``tasks`` (the include folders alone,
    0.1 s; lm-eval's bundled tasks too, ~5 s to index, only when a name is not in them), its
    tasks' data read once (before the merge) so that data out of reach is one line."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(p) for p in includes], include_defaults=False)
    if not all(t in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=[str(p) for p in includes], include_defaults=True)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = ", ".join(str(p) for p in includes)
        raise UserError(
            f"--lm-eval: unknown task {', '.join(map(repr, unknown))}: not in {where} nor "
            f"lm-eval {lm_eval_version()}'s bundled tasks; allowed: a task, group or tag "
            "name from a YAML file in those folders (--include DIR adds a folder)"
        )
    try:
        manager.load(tasks)
    except (ConnectionError, FileNotFoundError) as err:  # datasets: offline hub, no such file
        raise UserError(
            f"--lm-eval {','.join(tasks)}: cannot read a task's data: {_first_line(err)}"
            "; allowed: local data files (dataset_path: json, dataset_kwargs.data_files), or a "
            "hub dataset already in the datasets cache (fedhello keeps the hub offline unless "
            "the run's model.allow_download is true)"
        ) from None
    return manager


def evaluate_run(
    run_path: Path,
    names: str,
    includes: list[str] | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Score the finished run at ``run_path`` on lm-eval's ``names`` (comma-separated);
    returns what ``RUN/lm-eval/results.json`` holds (lm-eval's results, versions, sample
    counts and configs, with the lm-eval version, the task names and how it ran)."""
    run, cfg, tasks = check_eval(run_path, names, includes or [])  # lm-eval is installed
    import numpy as np
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    from fedhello.model.accelerator import resolve_device

    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: allowed: at least 1 example per task")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: allowed: at least 1")
    device = resolve_device(cfg.train.device)[0]  # a missing GPU fails before any work
    heldout = write_heldout_task(run, eval_paths(run).tasks, cfg, run_task(cfg))
    folders = [heldout, *(Path(p).resolve() for p in includes or [])]
    manager = task_manager(tasks, folders)  # unknown names fail before the merge
    model_dir = merged_model(run)
    precision = (run.recorded_precision() or {}).get("precision", "fp32")
    model_args: dict[str, Any] = {"pretrained": str(model_dir.resolve()), "dtype": "float32"}
    if precision in AUTOCAST:
        model_args["mixed_precision_dtype"] = AUTOCAST[precision]
    batch = batch_size or cfg.train.eval_batch_size
    t0 = time.perf_counter()
    states = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            out = simple_evaluate(
                model=harness_model(model_args, batch, str(device)), model_args=model_args,
                tasks=tasks, batch_size=batch, device=str(device), limit=limit,
                task_manager=manager, log_samples=True,
            )  # fmt: skip
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
    assert out is not None  # one process: lm-eval's rank 0
    result = {
        "run": str(run.path), "model": str(model_dir), "lm_eval_version": lm_eval_version(),
        "tasks": tasks, "include": [str(p) for p in folders], "limit": limit,
        "batch_size": batch, "device": str(device), "precision": precision,
        "seconds": round(time.perf_counter() - t0, 2),
        **{k: out.get(k) for k in ("results", "groups", "versions", "n-shot", "n-samples",
                                   "higher_is_better", "configs")},
    }  # fmt: skip
    base = eval_paths(run).base
    for old in base.glob("samples_*.jsonl"):
        old.unlink()
    for task, samples in (out.get("samples") or {}).items():
        with open(base / f"samples_{task}.jsonl", "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(s, default=handle_non_serializable) + "\n")
    text = json.dumps(result, indent=1, default=handle_non_serializable) + "\n"
    tmp = base / ".results.json.partial"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, eval_paths(run).results)
    return dict(json.loads(text))


def score_rows(result: dict[str, Any]) -> list[tuple[str, str, float, float | None, int | None]]:
    """(task, metric, value, stderr, examples) of every metric lm-eval reported."""
    rows = []
    counts = result.get("n-samples") or {}
    for task, scores in (result.get("results") or {}).items():
        n = (counts.get(task) or {}).get("effective")
        for key, value in scores.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, int | float):
                continue
            err = scores.get(f"{metric}_stderr,{filt}")
            name = metric if filt == "none" else f"{metric} ({filt})"
            rows.append((task, name, float(value), err if isinstance(err, float) else None, n))
    return rows


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
