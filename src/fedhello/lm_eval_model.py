"""lm-eval's ``hf`` model with one BOS per request (``harness_model``).

lm-eval 0.4.13's ``HFLM`` gives some requests two BOS tokens (below); fedhello's scores give
each request exactly the BOS its model's tokenizer or its text gives. Kept apart from
``fedhello.lm_eval_run`` (which builds the run's model and tasks and reads the results) because
it subclasses lm-eval's internals: a newer lm-eval must be checked against
``tests/test_lm_eval.py``'s BOS tests before this is trusted with it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["harness_model"]


def harness_model(model_args: dict[str, Any], batch_size: int, device: str) -> Any:
    """lm-eval's ``hf`` model (``HFLM``, made as ``simple_evaluate(model="hf", model_args=...)``
    makes it), with every request tokenized with the BOS its model's tokenizer or its text
    gives, once: one where the tokenizer adds one or the text starts with it (a chat template
    that writes ``{{ bos_token }}``), none where neither does.

    lm-eval 0.4.13 otherwise doubles it in two places, for a tokenizer that adds a BOS
    (Llama, Mistral, Gemma) or a text that starts with one (SmolLM2's ``<|im_start|>`` is its
    BOS): ``loglikelihood_rolling`` encodes the text with its BOS and then puts its own prefix
    (the same BOS) before it, scoring the BOS as the text's first token; and
    ``generate_until`` decides by a batch's first prompt whether all of them get the
    tokenizer's BOS, so a batch that mixes prompts written with and without one gets one
    prompt kind a second BOS or none. Here the rolling text's own BOS is the prefix (its
    first token is conditioned on one BOS, as ever), and a mixed batch is encoded prompt by
    prompt, then padded together."""
    import torch
    from lm_eval.models.huggingface import HFLM

    class OneBosHFLM(HFLM):
        rolling = False  # inside loglikelihood_rolling, whose windows prepend the BOS

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> Any:
            self.rolling = True
            try:
                return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
            finally:
                self.rolling = False

        def tok_encode(
            self,
            string: str,
            add_special_tokens: bool | None = None,
            left_truncate_len: int | None = None,
            **kwargs: Any,
        ) -> list[int]:
            ids = list(super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs))
            bos = self.tokenizer.bos_token_id
            if self.rolling and ids and bos is not None and ids[0] == bos == self.prefix_token_id:
                return ids[1:]  # the rolling windows put prefix_token_id (this BOS) first
            return ids

        def tok_batch_encode(
            self,
            strings: list[str],
            padding_side: str = "left",
            left_truncate_len: int | None = None,
            truncation: bool = False,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            bos = self.tokenizer.bos_token
            if not bos or len({s.startswith(bos) for s in strings}) < 2:
                return super().tok_batch_encode(
                    strings, padding_side, left_truncate_len, truncation
                )
            rows = []
            for s in strings:  # each alone, as lm-eval encodes a batch of one
                rows.append(
                    super().tok_batch_encode([s], padding_side, left_truncate_len, truncation)
                )
            width = max(ids.shape[1] for ids, _ in rows)

            def padded(t: torch.Tensor, value: int) -> torch.Tensor:
                gap = t.new_full((1, width - t.shape[1]), value)
                return torch.cat([gap, t] if padding_side == "left" else [t, gap], dim=1)

            pad = self.tokenizer.pad_token_id
            return torch.cat([padded(i, pad) for i, _ in rows]), torch.cat(
                [padded(m, 0) for _, m in rows]
            )

    return OneBosHFLM(**model_args, batch_size=batch_size, device=device)
