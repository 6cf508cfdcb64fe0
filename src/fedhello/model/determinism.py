"""Deterministic kernels (``train.deterministic``): what makes a CUDA run repeat bit for bit.

fedhello's exactness claims (a resumed run equals the uninterrupted one, Flower's simulation
equals the embedded engine, the strategies of a comparison are paired on identical clients)
are claims about sums done in the same order. A CPU does them so: its kernels are
deterministic at a fixed thread count, and runs repeat bit for bit with no setting at all.
A CUDA GPU does not by default: backward passes accumulate with atomics in whatever order
threads finish, cuBLAS picks its split-K reductions per workspace, cuDNN autotunes
(``benchmark``) and may use TF32 for fp32 convolutions (a ViT's patch embedding). There the
claims hold to rounding, and trajectories may drift apart over rounds.

``train.deterministic = true`` asks for PyTorch's deterministic mode, all of it process-wide:
``torch.use_deterministic_algorithms(True)`` (an operation without a deterministic kernel then
raises, naming itself, rather than silently breaking the claim), ``CUBLAS_WORKSPACE_CONFIG=
:4096:8`` (cuBLAS reads it when it first creates its workspace, so it must be in the
environment before the first matrix product on the GPU), and no TF32, cuDNN deterministic and
not autotuning. It costs speed; the default (false) keeps today's behaviour everywhere, and on
the CPU, where nothing is needed, true changes no number. Apple's MPS is outside PyTorch's
deterministic mode: there nothing is promised either way.

Library code never sets any of this (a library that changed a process's global state on import
or during a run would surprise its host): each process's entry point calls
:func:`configure_process` once, after reading the config (the ``fedhello`` CLI, the Flower
ClientApp and the deployed ServerApp do), and every run logs by :func:`log_run` what holds in
its process, with a warning where the config asks for determinism its process was not given.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_VALUE = ":4096:8"  # 8 buffers of 4 MiB; ":16:8" (less memory, slower) is also valid
CUBLAS_DETERMINISTIC = (CUBLAS_VALUE, ":16:8")  # what cuBLAS's deterministic mode accepts
WHAT = (
    f"deterministic algorithms, {CUBLAS_ENV}={CUBLAS_VALUE}, no TF32, cuDNN deterministic "
    "without autotuning"
)


def missing_settings() -> list[str]:
    """The parts of deterministic mode this process lacks (empty: all in force)."""
    cudnn = torch.backends.cudnn
    checks = {
        "torch.use_deterministic_algorithms(True)": torch.are_deterministic_algorithms_enabled()
        and not torch.is_deterministic_algorithms_warn_only_enabled(),
        f"{CUBLAS_ENV}={CUBLAS_VALUE}": os.environ.get(CUBLAS_ENV) in CUBLAS_DETERMINISTIC,
        "torch.backends.cuda.matmul.allow_tf32 = False": not torch.backends.cuda.matmul.allow_tf32,
        "torch.backends.cudnn.allow_tf32 = False": not cudnn.allow_tf32,
        "torch.backends.cudnn.deterministic = True": bool(cudnn.deterministic),
        "torch.backends.cudnn.benchmark = False": not cudnn.benchmark,
    }
    return [name for name, ok in checks.items() if not ok]


def configure_process(deterministic: bool) -> None:
    """Put this process in deterministic mode (``deterministic``), or leave it as it is (false:
    nothing is switched off either, so a host that set these itself keeps them). For a
    process's entry point, once, after reading its config and before the first GPU work;
    calling it again is harmless (a Flower node calls it at every message)."""
    if not deterministic or not missing_settings():
        return
    workspace = os.environ.get(CUBLAS_ENV)
    if workspace not in CUBLAS_DETERMINISTIC:
        if torch.cuda.is_initialized():
            logger.warning(
                "train.deterministic = true, but CUDA was initialised in this process before "
                "it was configured: cuBLAS may have read %s already (%r) and then keeps a "
                "non-deterministic workspace; set %s=%s in the environment before starting",
                CUBLAS_ENV, workspace, CUBLAS_ENV, CUBLAS_VALUE,
            )  # fmt: skip
        if workspace is not None:
            logger.warning(
                "%s=%r does not make cuBLAS deterministic (allowed: %s): replaced by %s",
                CUBLAS_ENV, workspace, ", ".join(CUBLAS_DETERMINISTIC), CUBLAS_VALUE,
            )  # fmt: skip
        os.environ[CUBLAS_ENV] = CUBLAS_VALUE
    torch.use_deterministic_algorithms(True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    logger.info("this process is deterministic (train.deterministic = true): %s", WHAT)


def run_note(deterministic: bool, device: torch.device) -> tuple[int, str]:
    """(log level, line) saying what repeats bit for bit in a run on ``device`` in this
    process, and why: the reason the run log gives (``log_run``)."""
    if deterministic:
        missing = missing_settings()
        if missing:
            return logging.WARNING, (
                "train.deterministic = true, but this process was not configured for it "
                f"(missing: {'; '.join(missing)}): its kernels may not be deterministic. Call "
                "fedhello.model.determinism.configure_process(True) first thing in the "
                "process (the fedhello CLI and the Flower apps do)"
            )
        if device.type == "mps":
            return logging.WARNING, (
                "train.deterministic = true on mps: PyTorch's deterministic mode covers CUDA "
                "and the CPU, not Apple's MPS kernels; runs may not repeat bit for bit"
            )
        return logging.INFO, f"deterministic on {device}: {WHAT}"
    if device.type == "cpu":
        return logging.INFO, (
            "deterministic on the CPU (its kernels are, at a fixed thread count): the same "
            "config and seed repeat bit for bit"
        )
    if device.type == "mps":
        return logging.INFO, (
            "not deterministic on mps (PyTorch's deterministic mode does not cover MPS): a "
            "resumed run, Flower's simulation and the paired strategies of a comparison agree "
            "with their counterparts to rounding, not bit for bit"
        )
    return logging.INFO, (
        f"train.deterministic = false on {device}: its kernels may sum in another order each "
        "run (atomics in backward passes, cuBLAS workspaces, cuDNN autotuning, TF32), so a "
        "resumed run, Flower's simulation and the paired strategies of a comparison agree "
        "with their counterparts to rounding, not bit for bit; train.deterministic = true "
        "makes CUDA runs exact (slower)"
    )


def log_run(deterministic: bool, device: torch.device) -> None:
    """The run log's line of ``run_note``."""
    level, line = run_note(deterministic, device)
    logger.log(level, line)
