"""The numerics version: which arithmetic a run's numbers come from (pure python).

A run is a function of its config and seed, computed by some arithmetic: the device and the
compute precision it resolved to (recorded in ``summary.json`` as ``device`` and ``precision``;
``fedhello compare`` already refuses to mix precisions) and the code that does the sums.
``NUMERICS_VERSION`` names the code's part. Bump it for every change after which the same
config, on the same device, in the same precision and thread count, gives other numbers (a loss
reduced in another order, a cast moved, an operation fused), and for no other change: adding a
device, a precision or a method whose existing settings compute as before is not a bump.

Every run records the version in ``summary.json`` (``numerics_version``). ``fedhello compare``
reuses a finished cell only when its version is today's, runs an older one again in place and
refuses a newer one (``fedhello.studies.compare``), so one table never mixes two arithmetics;
``fedhello report`` warns about a folder that does. A run written before the version was
recorded has none, and is version 1: every such run was computed with version 1's arithmetic
(see the log).

A run that has not finished is judged by its newest checkpoint, which records the version too
(``fedhello.store.checkpoint``): a resume continues from it only under the same version, since
the rounds before it would otherwise be of one arithmetic and those after it of another.

Log (newest last):

1. Everything to date. 48a7067 ("Accelerators: train.device and train.precision") added
   devices and compute precisions but left the fp32 sums on a CPU as they were. The config of
   docs/results/runs/dirichlet/fisher/seed2 gives bit-identical numbers before and after it:
   round 1 with 5 local steps the same test and train losses at 6903841 (before it), 48a7067
   and 3a51f96 (1 thread; the first two also with 2), two rounds of 2 steps the same losses,
   Fisher layer scores and final test loss at 6903841 and 3a51f96 (1 thread).
   What it did change is the default ``train.precision = "auto"``: bf16 on a CPU with
   AVX512-BF16 or AMX and on CUDA. A config.toml written before it has no ``train.precision``,
   so ``fedhello run`` of it on such a machine computed in bf16 (the run's ``precision`` said
   so). Not intended: a run's own ``config.toml`` is now read with the settings of its time
   (``fedhello.core.config.loading.is_run_config``: fp32 where it names no precision), so
   the published cell reruns as it ran; a copy of it elsewhere is a plain config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

NUMERICS_VERSION = 1

SUMMARY_KEY = "numerics_version"


def recorded_version(record: Mapping[str, Any]) -> int:
    """The numerics version of a run from its ``summary.json`` (or a round record): the one it
    records, else 1 (written before the version was recorded; see the module's docstring)."""
    return int(record.get(SUMMARY_KEY, 1))
