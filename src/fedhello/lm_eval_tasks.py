"""The run's held-out words as a ready local lm-eval task, ``fedhello_heldout``, written into
``RUN/lm-eval/tasks/`` for ``fedhello eval --lm-eval`` (``fedhello.lm_eval_run``).

lm-eval's bundled tasks say how a model does on the harness's benchmarks, not on what the run
learned to do; this task scores it on the run's own test split, whose words no client trained
on, so that lm-eval's numbers and fedhello's can be set side by side. Its rows are prompt/answer
pairs written with the chat template the run trained with; answers are greedy, of at most
``federation.max-new-tokens`` tokens, cut at the tokens fedhello's generation stops at, and
scored by fedhello's own exact match and ROUGE-L (``fedhello.model.generation``). The rows start
with the generation subset that ``summary.json``'s ``test_exact_match`` and ``test_rouge_l``
were measured on (``fedhello.engine.generative.generation_subset``), so ``--limit`` equal to
``generated_examples`` scores those very prompts.

The folder holds a task YAML, its JSONL rows and a small scorer module (which imports
fedhello's metrics, one definition). It is written once, beside its place and renamed in, and
kept while present (a user may edit it; delete it to rewrite it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from fedhello.core.config import Config
    from fedhello.store.runs import RunDir
    from fedhello.tasks import Task

logger = logging.getLogger(__name__)

HELDOUT_TASK = "fedhello_heldout"
METRICS_MODULE = "fedhello_heldout_metrics"

# The heldout task's scorer, beside its YAML: fedhello's exact match and ROUGE-L, imported (one
# definition), so lm-eval's numbers are fedhello's on the same answers.
METRICS_SOURCE = '''"""fedhello's scores of a generated answer (fedhello.model.generation)."""

from fedhello.model.generation import normalise, rouge_l


def process_results(doc, results):
    answer, reference = results[0].strip(), doc["answer"]
    return {
        "exact_match": float(normalise(answer) == normalise(reference)),
        "rouge_l": rouge_l([answer], [reference])[0],
    }
'''


def write_heldout_task(run: RunDir, folder: Path, cfg: Config, task: Task) -> Path:
    """``folder`` (resolved): the YAML, its JSONL and its scorer (see the module's docstring),
    from the run's data (``task``: the kind the run trained) and its base model's tokenizer
    (the merged model's); kept when present and pointing at this folder's JSONL (a user may
    edit it)."""
    folder = folder.resolve()
    data, yaml = folder / f"{HELDOUT_TASK}.jsonl", folder / f"{HELDOUT_TASK}.yaml"
    if yaml.is_file() and data.is_file() and json.dumps(str(data)) in yaml.read_text():
        return folder
    from fedhello.data.loading import load_raw
    from fedhello.engine.generative import generation_subset
    from fedhello.model.source import resolve_model_source

    download = cfg.model.allow_download
    raw = load_raw(cfg.data, task, download)
    # the summary's generation subset first, in its order, then the rest of the test split
    first = [int(i) for i in generation_subset(cast("Any", SimpleNamespace(cfg=cfg, raw=raw)))]
    rows = first + sorted(set(int(i) for i in raw.splits["test"]) - set(first))
    source = resolve_model_source(cfg.model.name, download)
    tok = task.load_processor(source, not download)
    chats = [[{"role": r, "content": c} for r, c in raw.inputs[i].prompt] for i in rows]
    # the prompt as training wrote it (fedhello.tasks.causal_lm): its tokens are the training
    # example's prefix, where fedhello's generation starts
    prompts = tok.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
    until = stop_strings(source, tok, download)
    tmp = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with open(tmp / data.name, "w", encoding="utf-8") as f:
        for i, prompt in zip(rows, prompts, strict=True):
            row = {"row": i, "prompt": prompt, "answer": raw.inputs[i].response}
            f.write(json.dumps(row) + "\n")
    (tmp / f"{METRICS_MODULE}.py").write_text(METRICS_SOURCE, encoding="utf-8")
    yaml_text = heldout_yaml(run, data, until, cfg.federation.max_new_tokens)
    (tmp / yaml.name).write_text(yaml_text, encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    logger.info("task %s: %d held-out prompts in %s", HELDOUT_TASK, len(rows), folder)
    return folder


def stop_strings(source: str, tok: Any, download: bool) -> list[str]:
    """lm-eval's ``until``: the text of each token fedhello's generation stops at
    (``fedhello.model.generation.stop_tokens``), from the base model's generation config."""
    from transformers import GenerationConfig

    from fedhello.model.generation import stop_tokens

    try:
        gen_cfg = GenerationConfig.from_pretrained(source, local_files_only=not download)
    except OSError:  # no generation_config.json: the tokenizer's EOS and the turn end
        gen_cfg = None
    stops = stop_tokens(SimpleNamespace(generation_config=gen_cfg), tok)
    return [u for u in (tok.decode([t], skip_special_tokens=False) for t in stops) if u]


def heldout_yaml(run: RunDir, data: Path, until: list[str], max_new_tokens: int) -> str:
    """The task's YAML: ``data`` as its test split, greedy answers cut at ``until``, scored by
    the scorer module beside it."""
    q = json.dumps  # a JSON string is a YAML double-quoted scalar
    return f"""\
# The test split of fedhello run {run.path.resolve()} (no client trained on it), written by
# `fedhello eval`. Prompts are in the run's chat template; answers are greedy; scored by
# fedhello's exact match and ROUGE-L ({METRICS_MODULE}.py). Delete this folder to rewrite it.
task: {HELDOUT_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {q(str(data))}
test_split: test
output_type: generate_until
doc_to_text: prompt
doc_to_target: answer
generation_kwargs:
  until: [{", ".join(q(u) for u in until)}]
  do_sample: false
  max_gen_toks: {max_new_tokens}
process_results: !function {METRICS_MODULE}.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
  - metric: rouge_l
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
