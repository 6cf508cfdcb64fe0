"""Tensors on the wire: a state as Flower's ``ArrayRecord`` and back. What a node sends is
untrusted, so an array is decoded only if it is what it declares (a numpy serialisation of its
dtype and shape, no larger than its bytes): an unreadable one marks its reply malformed rather
than stop the ServerApp (``fedhello.engine.flower.messages`` reads the replies).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

from fedhello.core.aggregation import State


def to_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def from_record(record: ArrayRecord) -> State:
    return {k: v.numpy() for k, v in record.items()}


def read_array(array: Array) -> np.ndarray:
    """One array of a node's reply, decoded only if it is what it claims: a numpy
    serialisation (``stype``) that decodes to an ndarray of its declared dtype and shape.
    Raises ``TypeError`` or ``ValueError`` naming what is wrong."""
    if array.stype != SType.NUMPY:
        raise TypeError(f"stype {array.stype!r}; allowed: {SType.NUMPY!r}")
    try:
        dtype = np.dtype(array.dtype)
        shape = [int(n) for n in array.shape]
    except (TypeError, ValueError) as err:
        raise TypeError(f"declares dtype {array.dtype!r} and shape {array.shape!r}") from err
    if min(shape, default=0) < 0:
        raise ValueError(f"declares shape {shape}; allowed: non-negative sizes")
    if math.prod(shape) * dtype.itemsize > len(array.data):  # before np.load allocates it
        raise ValueError(f"declares {dtype} {shape}, more than its {len(array.data)} bytes hold")
    try:
        value: Any = array.numpy()
    except Exception as err:  # untrusted bytes: np.load raises ValueError, EOFError, OSError...
        raise ValueError(f"its bytes do not decode as a numpy array ({err})") from err
    if not isinstance(value, np.ndarray):  # e.g. an .npz archive: np.load's other result
        if hasattr(value, "close"):
            value.close()
        raise TypeError(f"decodes to a {type(value).__name__}, not an array")
    if str(value.dtype) != array.dtype or list(value.shape) != list(array.shape):
        raise ValueError(
            f"decodes to {value.dtype} {list(value.shape)}, but declares {array.dtype} "
            f"{list(array.shape)}"
        )
    return value


def read_arrays(record: ArrayRecord) -> tuple[State, list[str]]:
    """The arrays of a node's reply that decode (``read_array``), and a problem per array that
    does not, naming its key and why: a reply is untrusted, and an unreadable array marks it
    malformed rather than stop the ServerApp."""
    state: State = {}
    problems: list[str] = []
    for key, array in record.items():
        try:
            state[key] = read_array(array)
        except (TypeError, ValueError) as err:
            problems.append(f"array {key!r} is unreadable: {err}")
    return state, problems
