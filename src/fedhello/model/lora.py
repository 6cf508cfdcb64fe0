"""LoRA on every block, the adapter state as numpy arrays, and per-round layer masks.

One PEFT model is built once. Each client in each round gets the global adapter state copied
in, ``requires_grad`` switched on for its allocated blocks' LoRA tensors and the head only, and
its upload copied out. Frozen LoRA tensors have no gradient and no optimizer state, and since
the frozen base below the lowest trained block needs no gradient either, autograd never runs
the backward pass below that block: weak clients really do less work.

Classifiers (encoders with a ``classifier``/``score`` head) train and average that head.
Causal language models (decoders such as Llama, Qwen2, Mistral, Gemma) have no trained head:
their ``lm_head`` is the vocabulary projection, often tied to the input embeddings, and stays
frozen, so the federated state is the LoRA tensors alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import GenerationMixin

from fedhello.core.errors import ModelError
from fedhello.core.layers import AdapterSpec, is_lora_key, keys_for_spec

HEAD_NAMES = ("classifier", "score")
# Query and value projections by architecture, tried in order for target_modules = ["auto"].
AUTO_TARGETS = (("query", "value"), ("q_proj", "v_proj"), ("q", "v"), ("c_attn",))
# A causal LM's ["auto"]: all four attention projections (Llama, Qwen2, Mistral, Gemma names).
# The MLP projections (gate_proj, up_proj, down_proj) only when named explicitly.
DECODER_AUTO_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (or ``model`` itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def is_causal_lm(model: torch.nn.Module) -> bool:
    """True for a decoder language model: it has no classification head, and it generates.

    The rule, on the model object rather than its config's ``architectures`` (which a model
    built in code or a config edited by hand need not name): no ``classifier``/``score``
    module (``HEAD_NAMES``), transformers' ``GenerationMixin`` among its classes (in
    transformers 5 only the generating classes, ``*ForCausalLM`` and the like, inherit it;
    ``*ForSequenceClassification`` does not) and an output embedding (``lm_head``). A PEFT
    wrapper is judged by the model it wraps.
    """
    inner = _unwrap(model)
    if any(isinstance(getattr(inner, n, None), torch.nn.Module) for n in HEAD_NAMES):
        return False
    if not isinstance(inner, GenerationMixin):
        return False
    get_output = getattr(inner, "get_output_embeddings", None)
    return callable(get_output) and isinstance(get_output(), torch.nn.Module)


def resolve_target_modules(model: torch.nn.Module, requested: Sequence[str]) -> list[str]:
    """The module names LoRA goes on. ``["auto"]``: on a causal LM with Llama-style names,
    the four attention projections (``DECODER_AUTO_TARGETS``); on anything else (the
    encoders), the attention query/value pair, as every published run resolved it."""
    leaf_names = {
        name.rsplit(".", 1)[-1]
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    if list(requested) == ["auto"]:
        if set(DECODER_AUTO_TARGETS) <= leaf_names and is_causal_lm(model):
            return list(DECODER_AUTO_TARGETS)
        for pair in AUTO_TARGETS:
            if set(pair) <= leaf_names:
                return list(pair)
        requested = AUTO_TARGETS[0]
    missing = [t for t in requested if t not in leaf_names]
    if missing:
        raise ModelError(
            f"lora.target_modules = {list(requested)}: {type(model).__name__} has no linear "
            f"module named {missing[0]!r}; its linear modules: {', '.join(sorted(leaf_names))}"
        )
    return list(requested)


def head_modules(model: torch.nn.Module) -> list[str]:
    """Names of the task head modules (trained and averaged by every client).

    A causal LM (``is_causal_lm``) has none: ``[]``, its ``lm_head`` stays frozen. Any other
    model is a classifier and must have one: a missing head is an error, not an empty list."""
    if is_causal_lm(model):
        return []
    names = [n for n in HEAD_NAMES if isinstance(getattr(model, n, None), torch.nn.Module)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no classification head ({HEAD_NAMES})")
    return names


def build_lora_model(
    model: torch.nn.Module, r: int, alpha: float, dropout: float, target_modules: Sequence[str]
) -> PeftModel:
    """LoRA on ``target_modules`` of every block. A classifier's head is a trainable copy
    (``modules_to_save``); a causal LM gets PEFT's ``CAUSAL_LM`` wrapper (which keeps
    ``generate`` working) and no head, so its keys read
    ``base_model.model.model.layers.N.self_attn.q_proj.lora_A.default.weight``."""
    heads = head_modules(model)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,  # type: ignore[arg-type]  # annotated int; any float scales alpha / r
        lora_dropout=dropout,
        target_modules=resolve_target_modules(model, target_modules),
        modules_to_save=heads or None,
        task_type=TaskType.CAUSAL_LM if is_causal_lm(model) else None,
    )
    return get_peft_model(model, config)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Gradient checkpointing on every block (``train.gradient_checkpointing``): a block keeps
    only its input and recomputes its activations when backward reaches it. Non-reentrant
    (``use_reentrant=False``): it needs no input that requires grad, so the frozen blocks below
    the lowest trained one still run no backward at all, and LoRA's gradients are exact."""
    inner: Any = model.get_base_model() if isinstance(model, PeftModel) else model
    if not getattr(inner, "supports_gradient_checkpointing", False):
        # a pooled head (fedhello.model.pooled) wraps the encoder, whose blocks checkpoint
        encoder = getattr(inner, "encoder", None)
        if not getattr(encoder, "supports_gradient_checkpointing", False):
            raise ModelError(
                f"train.gradient_checkpointing = true: {type(inner).__name__} does not "
                "support gradient checkpointing in transformers; allowed: false for this model"
            )
        inner = encoder
    inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # transformers also makes the embeddings' output require grad (for reentrant checkpointing,
    # which needs a grad-requiring input): that would run backward through every frozen block
    # below the lowest trained one. Non-reentrant checkpointing needs no such input: undo it.
    inner.disable_input_require_grads()


def is_head_key(name: str) -> bool:
    return ".modules_to_save." in name


def adapter_keys(model: torch.nn.Module) -> list[str]:
    """The federated state: every LoRA tensor and the trainable copy of the head."""
    return [n for n, _ in model.named_parameters() if is_lora_key(n) or is_head_key(n)]


def _params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return dict(model.named_parameters())


def get_state(model: torch.nn.Module, keys: Iterable[str]) -> dict[str, np.ndarray]:
    params = _params(model)
    return {k: _to_numpy(params[k].detach()) for k in keys}


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy copy of ``t``: the crossing to the aggregation boundary. From an accelerator the
    transfer is the copy; on the CPU the array must not alias the live parameter."""
    return t.cpu().numpy() if t.device.type != "cpu" else t.numpy().copy()


@torch.no_grad()
def set_state(model: torch.nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Copy ``state`` into the model. A LoRA factor of another rank (a rank method's slice,
    or the full rank back after one) replaces the parameter's storage, on its device and in
    its dtype: PEFT's forward is ``B(A(x)) * scale`` with the scale fixed at build time, so a
    rank-``r`` slice computes at rank ``r`` and is scaled as the whole adapter."""
    params = _params(model)
    for k, v in state.items():
        p = params[k]
        value = torch.from_numpy(np.ascontiguousarray(v))
        if tuple(p.shape) == value.shape:
            p.copy_(value)
        else:  # a copy: never alias the caller's array (a slice of the global state)
            p.data = value.to(device=p.device, dtype=p.dtype, copy=True)


def apply_spec_mask(
    model: torch.nn.Module, spec: AdapterSpec, layer_of: Mapping[str, int | None]
) -> list[torch.nn.Parameter]:
    """Train exactly the tensors of ``spec`` (``keys_for_spec(..., trained=True)``: its
    layers' LoRA factors, B alone under FFA-LoRA, and the head unless ``spec.head`` is
    ``frozen``); freeze every other parameter."""
    chosen = set(keys_for_spec(layer_of, spec, trained=True))
    trainable = []
    for name, param in model.named_parameters():
        train = name in chosen
        param.requires_grad_(train)
        if train:
            trainable.append(param)
    return trainable


def apply_layer_mask(
    model: torch.nn.Module, layers: Iterable[int], layer_of: Mapping[str, int | None]
) -> list[torch.nn.Parameter]:
    """Train exactly the LoRA tensors of ``layers`` and the head; freeze every other parameter."""
    return apply_spec_mask(model, AdapterSpec(tuple(layers)), layer_of)


def state_nbytes(state: Mapping[str, Any]) -> int:
    return int(sum(v.nbytes for v in state.values()))
