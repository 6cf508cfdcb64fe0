from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import fisher_scores_loop

from fedhello.core.layers import layer_of_keys
from fedhello.model.fisher import fisher_scores
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
