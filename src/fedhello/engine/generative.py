"""The run loop's scores for a generative task (``causal-lm``): what a round records, the
base model's zero-shot reference, and what the summary holds.

A classifier's round records accuracy; a language model's records, on the same fixed
evaluation subsets, the response-token ``test_loss`` and ``test_perplexity`` (and the
validation ones), and every ``federation.generate-every`` rounds ``test_rouge_l`` and
``test_exact_match`` of greedy answers to a fixed subset of test prompts (the *generation
subset*, ``federation.generate-examples`` of them). The summary scores the final model on the
whole test split (loss, perplexity) and on the generation subset (ROUGE-L, exact match),
beside ``zero_shot_rouge_l``: the same prompts answered by the base model before round 1 (a
fresh LoRA adds nothing: B starts at zero). That reference is measured once per run and kept
in the run folder (``zero_shot.json``), so a resumed run does not measure it again; the
final answers' first prompts go to ``generations.jsonl`` for a reader to see.
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from fedhello.core.seeds import Purpose, generator
from fedhello.model.generation import generation_scores, response_loss

if TYPE_CHECKING:
    from fedhello.core.aggregation import State
    from fedhello.engine.experiment import Experiment
    from fedhello.store.runs import RunDir

logger = logging.getLogger(__name__)

ZERO_SHOT_FILE = "zero_shot.json"
GENERATIONS_FILE = "generations.jsonl"


def is_generative(exp: Experiment) -> bool:
    """Whether ``exp``'s task is scored by generation (``Task.generative``)."""
    return bool(getattr(exp.task, "generative", False))


def generation_subset(exp: Experiment) -> np.ndarray:
    """The fixed test rows answered by generation: ``federation.generate-examples`` of the
    test split, drawn once from ``data.split-seed`` (the same for every strategy and seed of
    a comparison, as the evaluation subsets are), in row order."""
    test = exp.raw.splits["test"]
    n = exp.cfg.federation.generate_examples
    if len(test) <= n:
        return test
    rng = generator(exp.cfg.data.split_seed, Purpose.EVAL_SUBSET, 2)
    return np.sort(rng.choice(test, n, replace=False))


def _generate(exp: Experiment, keep: int | None = None) -> dict[str, Any]:
    cfg = exp.cfg
    return generation_scores(
        exp.model, exp.processor, exp.encoded, generation_subset(exp),  # type: ignore[arg-type]
        cfg.train.eval_batch_size, cfg.federation.max_new_tokens, exp.accelerator, keep,
    )  # fmt: skip


def round_scores(exp: Experiment, round_: int) -> dict[str, Any]:
    """A round's record of the global model (already in ``exp.model``)."""
    bs, accelerator, data = exp.cfg.train.eval_batch_size, exp.accelerator, exp.encoded
    test = response_loss(exp.model, data, exp.eval_test, bs, accelerator)  # type: ignore[arg-type]
    out: dict[str, Any] = {
        "test_loss": test["loss"],
        "test_perplexity": test["perplexity"],
        "eval_examples": test["examples"],
        "eval_subset": test["examples"] < len(exp.raw.splits["test"]),
    }
    if len(exp.eval_val):
        val = response_loss(exp.model, data, exp.eval_val, bs, accelerator)  # type: ignore[arg-type]
        out |= {"val_loss": val["loss"], "val_perplexity": val["perplexity"]}
    every = exp.cfg.federation.generate_every
    if every and round_ % every == 0:
        gen = _generate(exp)
        exp.last_generation = (round_, gen)
        out |= {"test_rouge_l": gen["rouge_l"], "test_exact_match": gen["exact_match"]}
    return out


def zero_shot(exp: Experiment, run: RunDir, state: State) -> dict[str, Any]:
    """The base model's answers to the generation subset, scored (measured before round 1
    with the initial adapter, which changes nothing; read back on resume)."""
    from fedhello.model.lora import set_state

    path = run.path / ZERO_SHOT_FILE
    if path.is_file():
        try:
            return dict(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError):
            logger.warning("%s is damaged: measuring the zero-shot answers again", path)
    set_state(exp.model, state)
    gen = _generate(exp)
    logger.info(
        "zero-shot (the base model, before round 1): ROUGE-L %.4f, exact match %.4f on %d "
        "test prompts", gen["rouge_l"], gen["exact_match"], gen["generated"],
    )  # fmt: skip
    tmp = path.with_name(path.name + ".tmp")  # atomic: a crash leaves it whole or absent
    tmp.write_text(json.dumps(gen, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return gen


def final_scores(exp: Experiment, run: RunDir, last_round: int | None = None) -> dict[str, Any]:
    """The summary's scores of the final model (already in ``exp.model``): whole test split
    loss and perplexity, the generation subset's ROUGE-L and exact match, the zero-shot ones;
    every answer written to ``generations.jsonl`` beside its reference (to score again).
    Where this process generated in the run's last round (``last_round``), that round's
    answers are the final model's: they are reused rather than generated again."""
    cfg = exp.cfg
    test = response_loss(exp.model, exp.encoded, exp.raw.splits["test"],  # type: ignore[arg-type]
                         cfg.train.eval_batch_size, exp.accelerator)  # fmt: skip
    done = exp.last_generation
    gen = done[1] if done is not None and done[0] == last_round else _generate(exp)
    base = json.loads((run.path / ZERO_SHOT_FILE).read_text(encoding="utf-8"))
    with open(run.path / GENERATIONS_FILE, "w", encoding="utf-8") as f:
        for sample in gen["samples"]:
            f.write(json.dumps(sample, sort_keys=True) + "\n")
    logger.info(
        "finished: test perplexity %.3f, ROUGE-L %.4f (zero-shot %.4f) on %d test prompts",
        test["perplexity"], gen["rouge_l"], base["rouge_l"], gen["generated"],
    )  # fmt: skip
    return {
        "test_loss": test["loss"],
        "test_perplexity": test["perplexity"],
        "test_examples": test["examples"],
        "test_tokens": test["tokens"],
        "test_rouge_l": gen["rouge_l"],
        "test_exact_match": gen["exact_match"],
        "generated_examples": gen["generated"],
        "zero_shot_rouge_l": base["rouge_l"],
        "zero_shot_exact_match": base["exact_match"],
        # answers cut at model.max_length (their first tokens trained, the rest not)
        "truncated_answers": int(getattr(exp.encoded, "truncated", 0)),
    }
