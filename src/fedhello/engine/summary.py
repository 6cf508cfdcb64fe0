"""The end of a run: the final model scored on the whole test split (a classifier's accuracy
and collapse measures, or a language model's generation scores), the PEFT adapter with what a
user needs to load it, and ``summary.json``. Split from the round loop (``engine.core``) so
that each stays one concern; every engine finishes through ``finish``.
"""

from __future__ import annotations

import json
import logging
import shutil
from typing import Any

import torch

from fedhello.core.aggregation import State
from fedhello.core.config import Config
from fedhello.core.numerics import NUMERICS_VERSION
from fedhello.engine import generative
from fedhello.engine.experiment import Experiment
from fedhello.model.adapter_folder import pin_target_modules, sort_target_modules
from fedhello.model.evaluation import evaluate
from fedhello.model.lora import set_state
from fedhello.model.model_card import AdapterFacts, write_model_card
from fedhello.model.pooling import pooled_module_file
from fedhello.store.provenance import code_provenance, git_commit
from fedhello.store.runs import RunDir

logger = logging.getLogger(__name__)

git_commit()  # the code as loaded, not as the checkout stands when a long run ends (cached)


def adapter_note(cfg: Config, pooling: str = "head") -> dict[str, Any]:
    """What the exported adapter is, beside PEFT's ``adapter_config.json`` (which plain PEFT
    reads; this file is for people): the method, the scaling convention and, for a pooled
    classifier, the base it loads onto."""
    base = (
        {"pooling": pooling, "base": "PooledForSequenceClassification.from_encoder(model, "
         f"{pooling!r}, labels) (or PooledForMultipleChoice) from modeling_fedhello_pooled.py "
         "in this folder, then peft.PeftModel.from_pretrained(base, this folder)"}
        if pooling != "head" else {"pooling": "head"}
    )  # fmt: skip
    return {
        **base,
        "method": cfg.allocation.strategy,
        "client_model": cfg.allocation.client_model,
        "freeze_a": cfg.lora.freeze_a,
        "r": cfg.lora.r,
        "lora_alpha": cfg.lora.alpha,
        "scaling": "alpha / r with the global r: every module, and every client's lower-rank "
        "slice in training, scaled by lora_alpha / r (PEFT applies the same to this adapter)",
    }


def adapter_facts(exp: Experiment) -> AdapterFacts:
    """How the run's adapter was trained, for its model card."""
    cfg = exp.cfg
    lora = exp.model.peft_config["default"]
    return AdapterFacts(
        model_name=cfg.model.name,
        task=exp.task.name,
        auto_class=exp.task.export_class,
        model_class=type(exp.model.get_base_model()).__name__,
        pooling=exp.pooling,
        num_labels=len(exp.raw.label_names),
        method=cfg.allocation.strategy,
        rounds=cfg.federation.rounds,
        clients=f"{cfg.clients.per_round} of {cfg.clients.num_clients} clients a round",
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        target_modules=sorted(getattr(lora, "target_modules", None) or ()),
        processor_class=(
            "AutoImageProcessor"
            if "ImageProcessor" in type(exp.processor).__name__
            else "AutoTokenizer"
        ),
    )


def finish(
    exp: Experiment,
    run: RunDir,
    state: State,
    seconds: float,
    engine: str,
    resumed_at: int | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Full-test evaluation, the PEFT adapter and summary.json (with ``extra`` in it).

    After the historical keys the summary holds the collapse measures of the whole test
    split: ``predicted_classes``, ``prediction_entropy`` (nats) and ``per_class_recall``
    (class name -> recall, 4 decimals; a class absent from the test labels is omitted). The
    run log warns when the final model answers (nearly) one class."""
    cfg = exp.cfg
    set_state(exp.model, state)
    records = run.read_metrics()
    last_round = records[-1]["round"] if records else None
    scores = (
        generative.final_scores(exp, run, last_round)
        if generative.is_generative(exp)
        else final_scores(exp)
    )
    # a low-precision base is scored as trained (reloading it in fp32 would cost the memory it
    # saves); the export merges into fp32, so the log says which model the scores are of
    if exp.accelerator.base_precision != "fp32":
        logger.info(
            "test scores are of the model as trained, its frozen base in %s; `fedhello export` "
            "merges the adapter into the fp32 base, which may score slightly differently",
            exp.accelerator.base_precision,
        )
    exp.model.save_pretrained(str(run.adapter_dir))
    (run.adapter_dir / "labels.json").write_text(json.dumps(exp.raw.label_names) + "\n")
    note = adapter_note(cfg, exp.pooling)
    (run.adapter_dir / "fedhello.json").write_text(json.dumps(note, indent=1) + "\n")
    if exp.pooling != "head":  # the pooled head's code, for a user with only the adapter
        shutil.copyfile(pooled_module_file(), run.adapter_dir / "modeling_fedhello_pooled.py")
        # the stock transformers class then fails to load it, instead of silently dropping the
        # LoRA (fedhello.model.adapter_folder says why)
        targeted: list[str] = exp.model.base_model.targeted_module_names  # type: ignore[assignment]
        pin_target_modules(run.adapter_dir, targeted, type(exp.model.get_base_model()).__name__)
    else:
        sort_target_modules(run.adapter_dir)
    write_model_card(run.adapter_dir, adapter_facts(exp))  # in place of PEFT's blank card
    clients = [c for r in records for c in r["clients"]]
    summary: dict[str, Any] = {
        "strategy": cfg.allocation.strategy,
        "engine": engine,
        "test_split": "whole",
        "rounds": cfg.federation.rounds,
        **scores,
        "num_classes": len(exp.raw.label_names),
        "num_layers": exp.num_layers,
        "budgets": exp.budgets,
        "floors": exp.strategy.floors,
        "tiers": exp.tiers,
        "target": exp.strategy.target(),
        "model_source": exp.source,
        "pooling": exp.pooling,
        # what train.head and train.loss ran as (auto resolved: fedhello.core.heads.auto_head)
        "head": cfg.train.head,
        "head_finetune_rounds": cfg.train.finetune_rounds(cfg.federation.rounds),
        "loss": cfg.train.loss,
        **exp.accelerator.describe(),
        # the code's arithmetic: a comparison reuses this run only under the same version
        "numerics_version": NUMERICS_VERSION,
        # which code and libraries computed it (a report names them), and the server's torch
        # threads as resolved (``run.threads = 0`` is torch's default, the machine's cores):
        # a comparison reuses it only with the same count
        "code": code_provenance(),
        "torch_threads": torch.get_num_threads(),
        # the run's whole wall time: a resumed run's is the time up to the checkpoint it
        # resumed from (kept in it) plus its own (``fedhello.engine.core.run_federation``)
        "wall_seconds": round(seconds, 2),
        "resumed_at_round": resumed_at,
        "client_seconds": round(sum(c["seconds"] for c in clients), 2),
        # their CPU time: what the clients cost, pauses and waiting for cores left out (None
        # where a client's record lacks it: written before fedhello measured it, in a run
        # resumed across, or by a node of such a fedhello)
        "client_cpu_seconds": (
            round(sum(c["cpu_seconds"] for c in clients), 2)
            if all(c.get("cpu_seconds") is not None for c in clients)
            else None
        ),
        "bytes_up": sum(c["bytes_up"] for c in clients),
        "bytes_down": sum(c["bytes_down"] for c in clients),
        "rejected_updates": sum(r["num_rejected"] for r in records),
        "budget_kind": cfg.clients.budget_kind,
        "fit": exp.resources.policy,
        "repairs": sum(r.get("num_repairs", 0) for r in records),
        # e.g. a source split whose labels are hidden, and which split was tested on instead
        **({"data_notes": exp.raw.notes} if exp.raw.notes else {}),
        **extra,
    }
    run.write_summary(summary)
    return summary


def final_scores(exp: Experiment) -> dict[str, Any]:
    """A classifier's summary scores on the whole test split: accuracy, macro-F1, loss and
    the collapse measures (how many classes the final model answers, how evenly, per class
    recall); the run log warns when it answers (nearly) one class."""
    final = evaluate(
        exp.model, exp.encoded, exp.raw.splits["test"], exp.cfg.train.eval_batch_size,
        exp.accelerator, exp.task, label_names=exp.raw.label_names, per_class=True,
        collapse_check="the whole test split (final)",
    )  # fmt: skip
    logger.info("finished: test accuracy %.4f", final["accuracy"])
    spread = ("predicted_classes", "prediction_entropy", "per_class_recall")
    return {
        "test_accuracy": final["accuracy"],
        "test_macro_f1": final["macro_f1"],
        "test_loss": final["loss"],
        "test_examples": final["examples"],
        **{k: final[k] for k in spread if k in final},
    }
