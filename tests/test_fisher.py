from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import fisher_scores_loop

from fedhello.core.errors import UserError
from fedhello.core.layers import layer_of_keys
from fedhello.data.encoding import Encoded
from fedhello.model.accelerator import Accelerator, cuda_native_bf16
from fedhello.model.fisher import FisherScale, finite_backward, fisher_scores
from fedhello.model.loading import load_model
from fedhello.model.lora import adapter_keys, build_lora_model, get_state, set_state


@pytest.mark.parametrize("kind", ["text", "image"])
def test_batched_fisher_equals_a_loop_of_single_example_backward_passes(
    kind: str, tiny_bert_dir: Path, tiny_vit_dir: Path
) -> None:
    from test_training import _image_data, _text_data

    torch.manual_seed(0)
    if kind == "text":
        loaded = load_model(str(tiny_bert_dir), ["class-0", "class-1", "class-2", "class-3"])
    else:
        loaded = load_model(str(tiny_vit_dir), ["a", "b", "c"])
    model = build_lora_model(loaded.model, 4, 8, 0.1, ["auto"])
    data = _text_data(loaded, 24) if kind == "text" else _image_data(loaded, 24)
    keys = adapter_keys(model)
    num_layers = model.config.num_hidden_layers
    layer_of = layer_of_keys(keys, num_layers)
    rng = np.random.default_rng(0)  # non-zero B: every LoRA tensor has a gradient
    set_state(
        model,
        {
            k: (v + rng.normal(0, 0.2, v.shape)).astype(v.dtype)
            for k, v in get_state(model, keys).items()
        },
    )
    idx = np.arange(24)
    batched = fisher_scores(model, data, idx, layer_of, num_layers, batch_size=7)
    loop = fisher_scores_loop(model, data, idx, layer_of, num_layers)
    assert all(s > 0 for s in loop)
    np.testing.assert_allclose(batched, loop, rtol=1e-4)
    # requires_grad flags are restored
    assert not any(p.requires_grad for n, p in model.named_parameters() if n not in layer_of)


def _perturbed(model: torch.nn.Module, seed: int = 0) -> dict[str, int | None]:
    """The model's ``layer_of``, after moving every adapter tensor off its initialisation (B
    non-zero: every LoRA tensor has a gradient)."""
    keys = adapter_keys(model)
    rng = np.random.default_rng(seed)
    set_state(
        model,
        {
            k: (v + rng.normal(0, 0.2, v.shape)).astype(v.dtype)
            for k, v in get_state(model, keys).items()
        },
    )
    return layer_of_keys(keys, model.config.num_hidden_layers)


def _choice_data(n: int, choices: int = 3, tokens: int = 9) -> Encoded:
    """``n`` multiple-choice examples: (n, choices, tokens) ids, each choice its own length."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1000, 2000, (n, choices, tokens), generator=gen)
    ids[..., 0] = 101  # [CLS]
    lengths = torch.randint(3, tokens + 1, (n, choices), generator=gen)
    mask = (torch.arange(tokens) < lengths.unsqueeze(-1)).long()
    labels = torch.randint(0, choices, (n,), generator=gen)
    return Encoded({"input_ids": ids * mask, "attention_mask": mask}, labels)


def _choice_model(tiny_bert_dir: Path, pooling: str) -> torch.nn.Module:
    torch.manual_seed(0)
    loaded = load_model(str(tiny_bert_dir), ["1", "2", "3"], "multiple-choice", pooling=pooling)
    return build_lora_model(loaded.model, 4, 8, 0.1, ["auto"])


@pytest.mark.parametrize("pooling", ["head", "mean"])  # BertForMultipleChoice; the pooled one
def test_multiple_choice_fisher_squares_each_examples_gradient_summed_over_its_choices(
    pooling: str, tiny_bert_dir: Path
) -> None:
    """The model sees (batch x choices, tokens); an example's gradient sums over its choices
    before the square, as a single-example backward pass computes it."""
    model = _choice_model(tiny_bert_dir, pooling)
    assert type(model.base_model.model).__name__ == (
        "BertForMultipleChoice" if pooling == "head" else "PooledForMultipleChoice"
    )
    layer_of = _perturbed(model)
    data, idx = _choice_data(10), np.arange(10)
    batched = fisher_scores(model, data, idx, layer_of, 4, batch_size=4)
    loop = fisher_scores_loop(model, data, idx, layer_of, 4)
    assert all(s > 0 for s in loop)
    np.testing.assert_allclose(batched, loop, rtol=1e-4)


def test_ffa_lora_scores_count_only_the_trained_b_factors(tiny_bert_dir: Path) -> None:
    """Under FFA-LoRA only B trains: its score is B's gradients alone, below both factors'."""
    from test_training import _text_data

    torch.manual_seed(0)
    loaded = load_model(str(tiny_bert_dir), ["class-0", "class-1", "class-2", "class-3"])
    model = build_lora_model(loaded.model, 4, 8, 0.1, ["auto"])
    layer_of = _perturbed(model)
    data, idx = _text_data(loaded, 12), np.arange(12)
    b_only = fisher_scores(model, data, idx, layer_of, 4, batch_size=5, factors="B")
    np.testing.assert_allclose(
        b_only, fisher_scores_loop(model, data, idx, layer_of, 4, factors="B"), rtol=1e-4
    )
    both = fisher_scores(model, data, idx, layer_of, 4, batch_size=5)
    assert all(0 < b < ab for b, ab in zip(b_only, both, strict=True))
    with pytest.raises(ValueError, match=r"factors = 'A'; allowed: AB, B"):
        fisher_scores(model, data, idx, layer_of, 4, factors="A")


def test_fp16_loss_scale_backs_off_from_an_overflow_and_scores_as_fp32(
    tiny_bert_dir: Path,
) -> None:
    """A real fp16 forward and backward (CPU autocast to fp16): a loss scale of 2^40 overflows
    fp16's 65504, the scale halves until the batch's gradients are finite, and the scores agree
    with the fp32 reference to fp16's precision (a fixed scale would have scored inf)."""
    from test_training import _text_data

    torch.manual_seed(0)
    loaded = load_model(str(tiny_bert_dir), ["class-0", "class-1", "class-2", "class-3"])
    model = build_lora_model(loaded.model, 4, 8, 0.1, ["auto"])
    layer_of = _perturbed(model)
    data, idx = _text_data(loaded, 12), np.arange(12)
    fp16 = Accelerator(torch.device("cpu"), "fp16", "fp32", "test: CPU autocast to fp16")
    scale = FisherScale(2.0**40)
    scores = fisher_scores(model, data, idx, layer_of, 4, 6, fp16, scale=scale)
    assert scale.value < 2.0**30  # halved (10 times and more) until fp16 held the gradients
    np.testing.assert_allclose(scores, fisher_scores_loop(model, data, idx, layer_of, 4), rtol=0.05)


def test_the_loss_scale_halves_until_finite_then_gives_up_with_one_clear_error() -> None:
    """The back-off alone, on a stand-in for the batch's backward: sums overflow while the scale
    is above 2^10 (the stand-in's one assumption about fp16)."""
    tried: list[float] = []

    def compute(s: float) -> list[float]:
        tried.append(s)
        return [math.inf if s > 2.0**10 else 3.0, 1.0]

    scale = FisherScale()
    assert finite_backward(compute, scale, "proxy examples 0..7") == [3.0, 1.0]
    assert tried == [2.0**k for k in range(16, 9, -1)] and scale.value == 2.0**10
    assert finite_backward(compute, scale, "the next batch") == [3.0, 1.0]  # starts at 2^10
    assert tried[-1] == 2.0**10 and len(tried) == 8
    with pytest.raises(UserError, match=r"proxy examples 8\.\.15 give non-finite gradients down "
                       r"to loss scale 0\.0039.*train\.precision = 'bf16' or 'fp32'"):  # fmt: skip
        finite_backward(lambda s: [math.nan], scale, "proxy examples 8..15")
    with pytest.raises(UserError, match=r"non-finite gradients \(the adapter"):
        finite_backward(lambda s: [math.inf], None, "proxy examples 0..7")  # fp32: no retry


@pytest.mark.parametrize(
    "module,what",
    [
        ("value", "a non-finite loss in fp32"),  # a NaN in the values reaches the logits
        ("query", "non-finite gradients"),  # CPU attention drops it forward, not backward
    ],
)
def test_a_diverged_adapter_is_one_clear_error_never_a_nan_score(
    module: str, what: str, tiny_bert_dir: Path
) -> None:
    from test_training import _text_data

    torch.manual_seed(0)
    loaded = load_model(str(tiny_bert_dir), ["class-0", "class-1", "class-2", "class-3"])
    model = build_lora_model(loaded.model, 4, 8, 0.1, ["auto"])
    layer_of = _perturbed(model)
    key = next(k for k in layer_of if f".layer.2.attention.self.{module}.lora_B" in k)
    state = get_state(model, [key])
    state[key][0, 0] = np.nan
    set_state(model, state)
    with pytest.raises(
        UserError, match=rf"Fisher scores: proxy examples 0\.\.4 \(of 8\) give {what}"
    ):
        fisher_scores(model, _text_data(loaded, 8), np.arange(8), layer_of, 4, batch_size=5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_fisher_on_cuda_scores_as_the_fp32_reference(precision: str, tiny_bert_dir: Path) -> None:
    """On the GPU, in fp16 with its dynamic loss scale (and bf16), multiple choice included."""
    from fedhello.model.accelerator import resolve

    if precision == "bf16" and not cuda_native_bf16(0):
        pytest.skip("this GPU has no bf16")
    model = _choice_model(tiny_bert_dir, "head")
    layer_of = _perturbed(model)
    data, idx = _choice_data(12), np.arange(12)
    loop = fisher_scores_loop(model, data, idx, layer_of, 4)
    acc = resolve("cuda", precision, precision)
    acc.place(model, set(layer_of))
    scores = fisher_scores(model, data, idx, layer_of, 4, 5, acc)
    np.testing.assert_allclose(scores, loop, rtol=0.05)
