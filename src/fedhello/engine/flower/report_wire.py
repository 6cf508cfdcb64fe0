"""A client's report on the Flower wire: encoded by the node (``node_messages.train_reply``),
decoded and type-checked by the server (``messages.read_train_reply``).

Both directions live together, apart from either half of the wire format, because they are
one mapping read off one declaration (``fedhello.model.report.SENT``): a field's wire key, the
record it travels in and its type are decided here once, so the node cannot send a key the
server does not read, and a field added to the declaration travels with no change here. The
server trusts nothing a node sends: decoding names every missing or mistyped field instead of
raising (the round goes on with the other clients).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedhello.model.report import SENT, ClientResult, ReportField


def wire_key(f: ReportField) -> str:
    return f.name.replace("_", "-")


def _record_of(f: ReportField) -> str:
    """Strings travel in the reply's ConfigRecord (a MetricRecord holds numbers only)."""
    return "config" if f.type is str else "metrics"


def encode_report(result: ClientResult) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metrics, config)`` of a train reply: every field the client measures, by its wire key
    (an optional field without a value is left out)."""
    out: dict[str, dict[str, Any]] = {"metrics": {}, "config": {}}
    for f in SENT:
        value = getattr(result, f.name)
        if value is not None:
            out[_record_of(f)][wire_key(f)] = f.type(value)
    return out["metrics"], out["config"]


def decode_report(
    metrics: Mapping[str, Any], config: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """Every field the client measures, read and type-checked, and what is wrong with the
    reply: a required field missing or any field of the wrong type (each problem names the
    key; such a field takes its declared default)."""
    records = {"metrics": metrics, "config": config}
    values: dict[str, Any] = {}
    problems: list[str] = []
    for f in SENT:
        where, key = _record_of(f), wire_key(f)
        values[f.name] = f.default
        if key not in records[where]:
            if f.required:
                problems.append(f"required {where} {key!r} is missing ({_describe(f)})")
            continue
        raw = records[where][key]
        if not _fits(raw, f.type):
            problems.append(
                f"{where} {key!r} = {raw!r} ({type(raw).__name__}); expected {_describe(f)}"
            )
            continue
        values[f.name] = f.type(raw)
    return values, problems


def _fits(value: Any, kind: type) -> bool:
    if isinstance(value, bool):  # a bool is an int to Python, never a count or a measure
        return False
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def _describe(f: ReportField) -> str:
    unit = f" in {f.unit}" if f.unit else ""
    return f"{f.type.__name__}{unit}: {f.doc}"
