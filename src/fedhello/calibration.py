"""``fedhello calibrate``: what each depth of training costs here, and what each client's limit
then affords.

It builds the config's model on its device and precision (the labels come from the data, so
the head has its real size), takes the stored cost profile of that setting or measures it
(``fedhello.model.probe``), and reports the table: per lowest trained block and layer count,
training memory (and on an accelerator the allocator's peak, which memory limits are checked
against there) and step time with the spread of the timed steps, the analytic model fitted to
it, whether the times passed their checks (``fedhello.core.coherence``) and, for limits in real
units, each tier's layer count and floor. Runs and comparisons with the same setting reuse the
profile it stored; a profile whose times failed twice is shown, with why, and not stored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedhello.core.budgets import client_limits, limit_source, tier_of
from fedhello.core.coherence import MIN_STEPS, spread_summary
from fedhello.core.config import Config
from fedhello.core.fit import MB, allowance
from fedhello.core.profile import FULL_TABLE_LAYERS

if TYPE_CHECKING:
    from fedhello.engine.resources import ModelUnderTest


def model_under_test(cfg: Config) -> ModelUnderTest:
    """``cfg``'s model as a client trains it, on its device and precision, with the head of
    the data's labels: what the probe measures."""
    from fedhello.data.loading import load_raw
    from fedhello.engine.node import build_node_model, model_task
    from fedhello.engine.resources import ModelUnderTest
    from fedhello.model.accelerator import accelerator_for

    accelerator = accelerator_for(cfg)  # a missing device fails before anything loads
    _, task, _ = model_task(cfg)  # the task's own checks of cfg run here
    raw = load_raw(cfg.data, task, cfg.model.allow_download)
    site = build_node_model(cfg, raw.label_names, accelerator)  # the model a client trains
    return ModelUnderTest(site.model, site.layer_of, site.num_layers, site.task,
                          len(raw.label_names), site.source, accelerator)  # fmt: skip


def calibrate(cfg: Config, steps: int = MIN_STEPS, remeasure: bool = False) -> dict[str, Any]:
    """The profile of ``cfg``'s setting (stored or measured) as plain data."""
    from fedhello.engine.resources import obtain_profile
    from fedhello.model.recipe import resolve_recipe
    from fedhello.store.profiles import profile_dir, profile_path

    m = model_under_test(cfg)
    # the probe trains as a client does: with train.head / train.loss auto resolved (its hooks)
    probed = resolve_recipe(cfg, m.task, m.model)
    profile, how = obtain_profile(probed, m, steps, remeasure)
    out: dict[str, Any] = {
        "profile": profile.to_json(),
        "source": how,
        "path": str(profile_path(profile_dir(cfg), profile.key)),
        "model_mb": sum(p.numel() * p.element_size() for p in m.model.parameters()) / MB,
        "spread": spread_summary(profile.table),
        "allowances": [],
    }
    c = cfg.clients
    limits = client_limits(cfg)
    seen: set[int] = set()
    for client, limit in enumerate(limits):
        tier = tier_of(client, c.num_clients, len(c.tiers))
        if limit is None or (c.budgets is None and tier in seen):
            continue
        seen.add(tier)
        who = f"client {client}" if c.budgets is not None else f"tier {tier}"
        if limit.step_seconds is not None and profile.step_time_problem is not None:
            # what a run would refuse, shown here next to the times that caused it
            refused = {"count": None, "floor": None, "refused": "no step times to trust"}
            out["allowances"].append({"who": who, "limit": str(limit), **refused})
            continue
        a = allowance(limit, profile, limit_source(cfg, client))
        out["allowances"].append(
            {"who": who, "limit": str(limit), "count": a.count, "floor": a.floor}
        )
    return out


def _tables(p: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(title, entry field, format) of each table shown: memory in the measure limits are
    checked against first."""
    meter = ("training memory, MB (saved activations + gradients + optimizer state)",
             "memory_mb", ".1f")  # fmt: skip
    step = ("step time, s (median ± the timed steps' median absolute deviation, % of it)",
            "step_seconds", ".3f")  # fmt: skip
    if p.get("memory_measure") == "allocator":
        peak = ("device memory, MB (the allocator's peak, the frozen model included: what "
                "memory limits are checked against here)", "device_peak_mb", ".1f")  # fmt: skip
        return [peak, meter, step]
    return [meter, step]


def _cell(entry: dict[str, Any], field: str, fmt: str) -> str:
    value = entry.get(field)
    if value is None:
        return ""
    text = format(value, fmt)
    mad = entry.get("step_mad_seconds")
    if field == "step_seconds" and mad is not None and value > 0:
        text += f"±{mad / value:.0%}"
    return text


def render_profile(result: dict[str, Any], console: Any) -> None:
    """The profile as tables: memory and step time per lowest block and layer count."""
    from rich.table import Table

    p = result["profile"]
    L, key = p["num_layers"], p["key"]
    warmup = p.get("warmup_steps", 0)
    console.print(
        f"cost profile ({result['source']}: {result['path']}): {key['model']} on "
        f"{key['device']}, {key['precision']} (base {key['base_precision']}), batch "
        f"{key['batch_size']}" + (f" x {key['max_length']} tokens" if key["max_length"] else "")
        + f"; model {result['model_mb']:.1f} MB, median of {p['probe_steps']} steps"
        + (f" after {warmup} warm-up" if warmup else "")
    )  # fmt: skip
    cells = {(e["lowest"], e["count"]): e for e in p["entries"]}
    if L > FULL_TABLE_LAYERS:  # a lattice (fedhello.core.profile.probe_entries): its entries
        table = Table(title=f"the {len(cells)} measured entries (a lattice: other layer sets "
                      "are bounded by the least entry at least as deep and as wide)")  # fmt: skip
        table.add_column("lowest", justify="right")
        table.add_column("layers", justify="right")
        shown = _tables(p)
        for what, _, _ in shown:
            table.add_column(what.split(",")[0], justify="right")
        for (b, n), e in sorted(cells.items()):
            table.add_row(str(b), str(n), *(_cell(e, field, fmt) for _, field, fmt in shown))
        console.print(table)
    for what, field, fmt in [] if L > FULL_TABLE_LAYERS else _tables(p):
        table = Table(title=f"{what}: lowest trained block x layers trained")
        table.add_column("lowest", justify="right")
        for n in range(1, L + 1):
            table.add_column(f"{n}", justify="right")
        for b in range(L):
            row = [_cell(cells[(b, n)], field, fmt) if (b, n) in cells else "" for n in
                   range(1, L + 1)]  # fmt: skip
            table.add_row(str(b), *row)
        console.print(table)
    fit = p.get("fit")
    if fit:
        mem, sec = fit["memory"], fit["seconds"]
        console.print(
            f"analytic model fitted: memory = {mem[0]:.1f} + {mem[1]:.1f} x depth + "
            f"{mem[2]:.2f} x layers MB (largest error {fit['memory_max_error']:.1%}); "
            f"step = {sec[0]:.3f} + {sec[1]:.3f} x depth + {sec[2]:.4f} x layers s (largest "
            f"error {fit['seconds_max_error']:.1%}); depth = L - lowest block"
        )
    problem = p.get("step_time_problem")
    if result.get("spread"):
        checked = "" if problem else "; checked: they rise with depth and fit the linear model"
        console.print(f"step times: {result['spread']}{checked}")
    if problem:
        console.print(f"step times NOT to be trusted, so not stored: {problem}")
    for a in result["allowances"]:
        if a.get("refused"):
            console.print(f"{a['who']}: {a['limit']} -> refused: {a['refused']}")
            continue
        console.print(
            f"{a['who']}: {a['limit']} -> {a['count']} layers, from block {a['floor']} up"
        )
