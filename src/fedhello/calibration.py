"""``fedhello calibrate``: what each depth of training costs here, and what each client's limit
then affords.

It builds the config's model on its device and precision (the labels come from the data, so
the head has its real size), takes the stored cost profile of that setting or measures it
(``fedhello.model.probe``), and reports the table: per lowest trained block and layer count,
training memory and step time, the analytic model fitted to it, and, for limits in real
units, each tier's layer count and floor. Runs and comparisons with the same setting reuse the
profile it stored.
"""

from __future__ import annotations

from typing import Any

from fedhello.core.budgets import client_limits, limit_source, tier_of
from fedhello.core.config import Config
from fedhello.core.fit import MB, allowance


def calibrate(cfg: Config, steps: int = 3, remeasure: bool = False) -> dict[str, Any]:
    """The profile of ``cfg``'s setting (stored or measured) as plain data."""
    from fedhello.data.loading import load_raw
    from fedhello.engine.experiment import build_node_model, model_task
    from fedhello.engine.resources import ModelUnderTest, obtain_profile
    from fedhello.model.accelerator import accelerator_for
    from fedhello.store.profiles import profile_dir, profile_path

    accelerator = accelerator_for(cfg)  # a missing device fails before anything loads
    _, task, _ = model_task(cfg)  # the task's own checks of cfg run here
    raw = load_raw(cfg.data, task, cfg.model.allow_download)
    site = build_node_model(
        cfg, raw.label_names, accelerator
    )  # the model a client trains, its head
    m = ModelUnderTest(site.model, site.layer_of, site.num_layers, site.task,
                       len(raw.label_names), site.source, accelerator)  # fmt: skip
    profile, how = obtain_profile(cfg, m, steps, remeasure)
    out: dict[str, Any] = {
        "profile": profile.to_json(),
        "source": how,
        "path": str(profile_path(profile_dir(cfg), profile.key)),
        "model_mb": sum(p.numel() * p.element_size() for p in site.model.parameters()) / MB,
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
        a = allowance(limit, profile, limit_source(cfg, client))
        who = f"client {client}" if c.budgets is not None else f"tier {tier}"
        out["allowances"].append(
            {"who": who, "limit": str(limit), "count": a.count, "floor": a.floor}
        )
    return out


def render_profile(result: dict[str, Any], console: Any) -> None:
    """The profile as tables: memory and step time per lowest block and layer count."""
    from rich.table import Table

    p = result["profile"]
    L, key = p["num_layers"], p["key"]
    console.print(
        f"cost profile ({result['source']}: {result['path']}): {key['model']} on "
        f"{key['device']}, {key['precision']} (base {key['base_precision']}), batch "
        f"{key['batch_size']}" + (f" x {key['max_length']} tokens" if key["max_length"] else "")
        + f"; model {result['model_mb']:.1f} MB, median of {p['probe_steps']} steps"
    )  # fmt: skip
    cells = {(e["lowest"], e["count"]): e for e in p["entries"]}
    for what, field, fmt in (
        ("training memory, MB (saved activations + gradients + AdamW state)", "memory_mb", ".1f"),
        ("step time, s", "step_seconds", ".3f"),
    ):
        table = Table(title=f"{what}: lowest trained block x layers trained")
        table.add_column("lowest", justify="right")
        for n in range(1, L + 1):
            table.add_column(f"{n}", justify="right")
        for b in range(L):
            row = [format(cells[(b, n)][field], fmt) if (b, n) in cells else "" for n in
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
    for a in result["allowances"]:
        console.print(
            f"{a['who']}: {a['limit']} -> {a['count']} layers, from block {a['floor']} up"
        )
