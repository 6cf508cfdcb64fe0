"""The paper's datasets as the hub holds them, on small local fixtures with the same columns,
features and split names (made with ``datasets`` and ``save_to_disk``), run from the presets in
configs/paper/ with tiny random models: the code path a user hits with the real data."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import NUM_CLASSES, WORDS, make_tiny_bert, tiny_overrides

from fedhello.cli import main
from fedhello.core.config import load_config
from fedhello.core.errors import DataError
from fedhello.data.loading import load_raw
from fedhello.store.rerun import without_machine
from fedhello.store.runs import RunDir
from fedhello.tasks import task_for

PAPER = Path(__file__).resolve().parent.parent / "configs" / "paper"
GLUE_NAMES = {"sst2": ["negative", "positive"], "qqp": ["not_duplicate", "duplicate"],
              "qnli": ["entailment", "not_entailment"]}  # fmt: skip


def _sentence(rng: np.random.Generator, label: int, words: int = 4) -> str:
    return " ".join(rng.choice(WORDS[label % NUM_CLASSES], words))


def _save(splits: dict[str, dict[str, list[Any]]], features: Any, out: Path) -> Path:
    import datasets

    datasets.DatasetDict(
        {k: datasets.Dataset.from_dict(v, features=features) for k, v in splits.items()}
    ).save_to_disk(str(out))
    return out


def glue_fixture(task: str, out: Path, rows: int = 240) -> Path:
    """nyu-mll/glue's ``task``: its columns and ClassLabel, idx, and a test split whose labels
    are all -1 (hidden), as on the hub."""
    import datasets

    columns = {"sst2": ["sentence"], "qqp": ["question1", "question2"],
               "qnli": ["question", "sentence"]}[task]  # fmt: skip
    features = datasets.Features(
        {**{c: datasets.Value("string") for c in columns},
         "label": datasets.ClassLabel(names=GLUE_NAMES[task]), "idx": datasets.Value("int32")}
    )  # fmt: skip
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", rows), ("validation", rows // 4), ("test", rows // 4)):
        labels = rng.integers(0, 2, n)
        splits[split] = {
            **{c: [_sentence(rng, int(y) + 2 * i) for y in labels] for i, c in enumerate(columns)},
            "label": [-1] * n if split == "test" else labels.tolist(),
            "idx": list(range(n)),
        }
    return _save(splits, features, out)


def ledgar_fixture(out: Path, rows: int = 200) -> Path:
    """coastalcph/lex_glue ``ledgar``: long ``text`` (longer than 512 tokens, so truncation
    matters), a 100-name ClassLabel, train/validation/test."""
    import datasets

    names = [f"provision-{i}" for i in range(100)]
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=names)})  # fmt: skip
    rng = np.random.default_rng(1)
    splits = {}
    for split, n in (("train", rows), ("validation", rows // 4), ("test", rows // 4)):
        labels = rng.integers(0, 8, n)
        splits[split] = {"text": [_sentence(rng, int(y), 600) for y in labels],
                         "label": labels.tolist()}  # fmt: skip
    return _save(splits, features, out)


def belebele_fixture(out: Path, rows: int = 160) -> Path:
    """facebook/belebele ``eng_Latn``: one ``test`` split, passage, question, four answers,
    ``correct_answer_num`` a string numbered from 1."""
    import datasets

    string = datasets.Value("string")
    features = datasets.Features({
        "link": string, "question_number": datasets.Value("int64"), "flores_passage": string,
        "question": string, **{f"mc_answer{i}": string for i in range(1, 5)},
        "correct_answer_num": string, "dialect": string,
    })  # fmt: skip
    rng = np.random.default_rng(2)
    topic = rng.integers(0, NUM_CLASSES, rows)
    right = rng.integers(1, 5, rows)
    cols: dict[str, list[Any]] = {k: [] for k in features}
    for t, r in zip(topic, right, strict=True):
        cols["link"].append("https://example.org/p")
        cols["question_number"].append(1)
        cols["flores_passage"].append(_sentence(rng, int(t), 30))
        cols["question"].append("which word belongs with the passage ?")
        for i in range(1, 5):
            cols[f"mc_answer{i}"].append(_sentence(rng, int(t) if i == r else int(t) + 1, 2))
        cols["correct_answer_num"].append(str(r))
        cols["dialect"].append("eng_Latn")
    return _save({"test": cols}, features, out)


def cifar_fixture(out: Path, rows: int = 240, size: int = 32, test_rows: int = 60) -> Path:
    """uoft-cs/cifar100: ``img`` (Image feature, PNG bytes), ``fine_label`` (100 names),
    ``coarse_label`` (20 names), train/test."""
    import datasets

    fine = [f"fine-{i}" for i in range(100)]
    coarse = [f"coarse-{i}" for i in range(20)]
    features = datasets.Features({"img": datasets.Image(),
                                  "fine_label": datasets.ClassLabel(names=fine),
                                  "coarse_label": datasets.ClassLabel(names=coarse)})  # fmt: skip
    rng = np.random.default_rng(3)
    splits = {}
    for split, n in (("train", rows), ("test", test_rows)):
        labels = rng.integers(0, 5, n)
        images = []
        for y in labels:
            img = rng.integers(0, 80, (size, size, 3)).astype(np.uint8)
            img[..., y % 3] += np.uint8(100 + 30 * (y // 3))
            images.append(img)
        splits[split] = {"img": images, "fine_label": labels.tolist(),
                         "coarse_label": (labels // 5).tolist()}  # fmt: skip
    return _save(splits, features, out)


@pytest.fixture(scope="module")
def long_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT with 512 positions (LEDGAR's length)."""
    return make_tiny_bert(tmp_path_factory.mktemp("long-bert"), positions=512)


@pytest.fixture(scope="module")
def vit32_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-block tiny ViT taking 32 x 32 images (CIFAR's size goes through a real resize
    only in the memory test); its processor resizes and normalises as ViT-B/16's does."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    out = tmp_path_factory.mktemp("vit32")
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3,
                       num_attention_heads=2, intermediate_size=64)  # fmt: skip
    ViTModel(config).save_pretrained(out)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def run_preset(preset: str, model: Path, data: Path, out: Path, *extra: str) -> int:
    """``fedhello run configs/paper/<preset>.toml`` on local copies, federation shrunk."""
    args = ["run", str(PAPER / f"{preset}.toml"), "--out", str(out)]
    overrides = tiny_overrides(model, data, model__allow_download="false",
                               train__batch_size=16, train__local_epochs=0.5,
                               allocation__fisher_warmup=0, allocation__fisher_every=1)  # fmt: skip
    for o in [*overrides, *extra]:
        args += ["--set", o]
    return main(args)


@pytest.mark.parametrize("task", ["sst2", "qqp", "qnli"])
def test_glue_shaped_data_trains_and_is_tested_on_its_validation_split(
    task: str, tmp_path: Path, tiny_bert_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = glue_fixture(task, tmp_path / task)
    caplog.set_level("INFO", logger="fedhello")
    assert run_preset(task, tiny_bert_dir, data, tmp_path / "run") == 0
    run = RunDir(tmp_path / "run")
    summary = run.read_summary()
    # the hidden test split (60 rows of -1) is never scored: the validation split (60) is
    assert summary["test_examples"] == 60 and summary["num_classes"] == 2
    notes = summary["data_notes"]
    assert "hidden" in notes["test_split"] and "validation" in notes["test_source"]
    assert any("validation split" in r.getMessage() for r in caplog.records)
    assert len(run.read_metrics()) == 2
    assert json.loads((run.adapter_dir / "labels.json").read_text()) == GLUE_NAMES[task]


@pytest.mark.parametrize("task", ["qqp", "qnli"])
def test_a_sentence_pair_is_tokenised_as_a_pair(task: str, tmp_path: Path,
                                                tiny_bert_dir: Path) -> None:  # fmt: skip
    from transformers import AutoTokenizer

    from fedhello.data.encoding import encode

    cfg = load_config(PAPER / f"{task}.toml", [f'data.name="{glue_fixture(task, tmp_path)}"'])
    raw = load_raw(cfg.data, task_for("text"), False)
    first, second = raw.inputs[0]
    assert isinstance(first, str) and isinstance(second, str) and first != second
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    data = encode(raw, tok, 32)
    batch = data.batch([0])
    direct = tok(first, second, truncation=True, max_length=32)
    assert batch["input_ids"][0].tolist() == direct["input_ids"]
    assert batch["token_type_ids"][0].tolist() == direct["token_type_ids"]
    assert 1 in direct["token_type_ids"]  # the second segment is marked as such


def test_ledgar_shaped_long_documents_train_at_512_tokens(
    tmp_path: Path, long_bert_dir: Path
) -> None:
    data = ledgar_fixture(tmp_path / "ledgar")
    assert run_preset("ledgar", long_bert_dir, data, tmp_path / "run", "model.max_length=512") == 0
    summary = RunDir(tmp_path / "run").read_summary()
    # the source's own test split (50 rows, labels present) is the test split
    assert summary["test_examples"] == 50 and summary["num_classes"] == 100
    assert "data_notes" not in summary
    assert 0 <= summary["test_macro_f1"] <= 1
    cfg = load_config(PAPER / "ledgar.toml", [f'data.name="{data}"'])
    raw = load_raw(cfg.data, task_for("text"), False)
    from transformers import AutoTokenizer

    from fedhello.data.encoding import encode

    batch = encode(raw, AutoTokenizer.from_pretrained(long_bert_dir), 512).batch([0, 1])
    assert batch["input_ids"].shape == (2, 512)  # truncated at 512, not shorter


def test_belebele_shaped_multiple_choice_trains_and_exports(
    tmp_path: Path, tiny_bert_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import AutoTokenizer

    from fedhello.data.encoding import encode

    data = belebele_fixture(tmp_path / "belebele")
    cfg = load_config(PAPER / "belebele.toml", [f'data.name="{data}"'])
    raw = load_raw(cfg.data, task_for("multiple-choice"), False)
    import datasets

    answers = datasets.load_from_disk(str(data))["test"]["correct_answer_num"]
    assert raw.labels.tolist() == [int(a) - 1 for a in answers]  # numbered from 1
    assert raw.label_names == ["1", "2", "3", "4"]
    assert "one split" in raw.notes["test_source"]  # carved from the only split
    encoded = encode(raw, AutoTokenizer.from_pretrained(tiny_bert_dir), 48)
    batch = encoded.batch([0, 1, 2])
    assert batch["input_ids"].shape[:2] == (3, 4)  # one sequence per choice

    caplog.set_level("INFO", logger="fedhello")
    assert run_preset("belebele", tiny_bert_dir, data, tmp_path / "run",
                      "model.max_length=48") == 0  # fmt: skip
    run = RunDir(tmp_path / "run")
    summary = run.read_summary()
    assert summary["num_classes"] == 4 and summary["test_examples"] == 16
    assert "base_model.model.classifier.weight" in _adapter_keys(run)  # the head is federated
    out = tmp_path / "merged"
    assert main(["export", str(tmp_path / "run"), "--merged", str(out)]) == 0
    from transformers import AutoModelForMultipleChoice

    model = AutoModelForMultipleChoice.from_pretrained(out, trust_remote_code=True)
    assert model(**{k: v for k, v in batch.items() if k != "labels"}).logits.shape == (3, 4)


def test_multiple_choice_budgets_in_megabytes_hold(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """The cost profile of a multiple-choice model is measured on (batch, choices, tokens)
    inputs, and the clients' memory limits hold as they do for classification."""
    import fedhello

    data = belebele_fixture(tmp_path / "belebele")
    extra = [f'run.profile_dir="{tmp_path / "profiles"}"', "model.max_length=32",
             'train.precision="fp32"', "train.batch_size=8"]  # fmt: skip
    cfg = fedhello.load_config(
        PAPER / "belebele.toml", [*tiny_overrides(tiny_bert_dir, data), *extra]
    )
    entries = fedhello.calibrate(cfg, steps=1)["profile"]["entries"]
    full = next(e["memory_mb"] for e in entries if (e["lowest"], e["count"]) == (0, 4))
    top = next(e["memory_mb"] for e in entries if (e["lowest"], e["count"]) == (3, 1))
    assert full > 2 * top  # backward stops at the lowest trained block, as for classification
    limits = [round(top * 1.5, 3), round(full * 1.02, 3)]
    budget = ['clients.budget_kind="memory-mb"', f"clients.tiers={limits}"]
    assert run_preset("belebele", tiny_bert_dir, data, tmp_path / "run", *extra, *budget) == 0
    clients = [c for r in RunDir(tmp_path / "run").read_metrics() for c in r["clients"]]
    assert any(len(c["layers"]) < 4 for c in clients)
    for c in clients:
        assert c["train_memory_mb"] <= c["memory_limit_mb"] * 1.05, c


def _adapter_keys(run: RunDir) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(run.adapter_dir / "adapter_model.safetensors"), "pt") as f:
        return list(f.keys())


def test_cifar_shaped_images_train_with_augmentation_the_same_twice(
    tmp_path: Path, vit32_dir: Path
) -> None:
    data = cifar_fixture(tmp_path / "cifar")
    for name in ("a", "b"):
        assert run_preset("cifar100", vit32_dir, data, tmp_path / name) == 0
    a, b = RunDir(tmp_path / "a"), RunDir(tmp_path / "b")
    assert without_machine(a.read_metrics()) == without_machine(b.read_metrics())
    summary = a.read_summary()
    assert summary["num_classes"] == 100 and summary["test_examples"] == 60
    off = tmp_path / "off"
    assert run_preset("cifar100", vit32_dir, data, off, "data.augment=false") == 0
    # augmentation changes what clients train on (same seed, same batches otherwise)
    assert without_machine(RunDir(off).read_metrics()) != without_machine(a.read_metrics())


def test_augmented_pixels_are_seeded_by_round_client_and_step(
    tmp_path: Path, vit32_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from transformers import AutoImageProcessor

    from fedhello.data.encoding import encode

    data_dir = cifar_fixture(tmp_path / "c", rows=40, size=24)
    cfg = load_config(PAPER / "cifar100.toml", [f'data.name="{data_dir}"'])
    raw = load_raw(cfg.data, task_for("image"), False)
    processor = AutoImageProcessor.from_pretrained(vit32_dir)
    data = encode(raw, processor, 16)
    rows = [0, 5, 7]
    state = torch.random.get_rng_state()
    reseeded: list[int] = []  # a GPU's generator, which fork_rng(devices=[]) would not restore
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    first = data.batch(rows, (0, 1, 2, 3))["pixel_values"]
    assert torch.equal(torch.random.get_rng_state(), state)  # the process's generator untouched
    assert reseeded == []  # nor the accelerators': the step's dropout keeps its own seed
    assert first.shape == (3, 3, 32, 32)  # cropped and resized to the model's input
    assert torch.equal(first, encode(raw, processor, 16).batch(rows, (0, 1, 2, 3))["pixel_values"])
    for other in [(1, 1, 2, 3), (0, 2, 2, 3), (0, 1, 3, 3), (0, 1, 2, 4)]:
        assert not torch.equal(first, data.batch(rows, other)["pixel_values"])
    plain = data.batch(rows)["pixel_values"]  # evaluation: the processor's resize only
    images = [data.images[i] for i in rows]
    from fedhello.data.images import as_image

    expected = processor(images=[as_image(x) for x in images], return_tensors="pt")
    assert torch.equal(plain, expected["pixel_values"].float())
    assert float(first.min()) >= -1.0 and float(first.max()) <= 1.0  # normalised as ViT's


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    from transformers import ViTImageProcessor
    from fedhello.core.config import load_config
    from fedhello.data.encoding import encode
    from fedhello.data.loading import load_raw
    from fedhello.tasks import task_for

    def rss_mb():  # the current resident set, from /proc
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20

    data_dir, size = sys.argv[1], int(sys.argv[2])
    processor = ViTImageProcessor(size={"height": size, "width": size})
    cfg = load_config(None, [f'data.name="{data_dir}"', 'data.image_column="img"',
                             'data.label_column="fine_label"'])
    import kornia.augmentation  # imports first: the measure is the data's, not the libraries'
    encode(load_raw(cfg.data, task_for("image"), False), processor, 16).batch([0], (0, 0, 0, 0))
    before = rss_mb()
    peak = before
    raw = load_raw(cfg.data, task_for("image"), False)
    data = encode(raw, processor, 16)
    rows = raw.splits["train"]
    for step, start in enumerate(range(0, len(rows), 64)):  # every training image, augmented
        batch = data.batch(rows[start : start + 64], (0, 1, 2, step))
        peak = max(peak, rss_mb())
    for start in range(0, len(raw.splits["test"]), 64):  # every test image, plain
        data.batch(raw.splits["test"][start : start + 64])
        peak = max(peak, rss_mb())
    print(json.dumps({"growth_mb": peak - before, "images": len(raw.labels),
                      "pixels": list(batch["pixel_values"].shape)}))
    """
)


@pytest.mark.slow
def test_memory_for_images_does_not_grow_with_their_number(tmp_path: Path) -> None:
    """A ViT-sized pipeline (64 px here, to keep the test short) over 1,000 and 4,000 small
    images: the data's memory is a few batches, not a pixel tensor per image. Encoding once
    would hold 4 x 3 x 64 x 64 bytes = 48 KiB per image: ~141 MB more for 3,000 more images."""
    script = tmp_path / "measure.py"
    script.write_text(MEMORY_SCRIPT)
    growth = {}
    for n in (1000, 4000):
        data = cifar_fixture(tmp_path / f"c{n}", rows=n - n // 5, test_rows=n // 5)
        out = subprocess.run([sys.executable, str(script), str(data), "64"], check=True,
                             capture_output=True, text=True).stdout  # fmt: skip
        result = json.loads(out.strip().splitlines()[-1])
        assert result["images"] == n and result["pixels"][1:] == [3, 64, 64]
        growth[n] = result["growth_mb"]
    eager_extra = 3000 * 4 * 3 * 64 * 64 / 2**20  # what a dataset-sized tensor would add
    print(f"data memory growth: {growth} MB; eager encoding would add {eager_extra:.0f} MB")
    assert growth[4000] - growth[1000] < 20, (growth, eager_extra)


def test_a_split_with_some_negative_labels_is_one_clear_error(tmp_path: Path) -> None:
    import datasets

    data = tmp_path / "d"
    table = datasets.Dataset.from_dict
    datasets.DatasetDict({
        "train": table({"sentence": ["a b", "c d", "e f"], "label": [0, 1, 0]}),
        "test": table({"sentence": ["a", "b", "c"], "label": [0, -1, 1]}),
    }).save_to_disk(str(data))  # fmt: skip
    cfg = load_config(None, [f'data.name="{data}"', 'data.text_column="sentence"'])
    with pytest.raises(DataError) as err:
        load_raw(cfg.data, task_for("text"), False)
    message = str(err.value)
    assert "'test' has 1 negative labels of 3" in message and "allowed" in message


def test_a_file_with_an_empty_label_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\na b,x\nc d,\ne f,y\n")  # row 1: an empty cell (NaN)
    cfg = load_config(None, [f'data.name="{path}"'])
    with pytest.raises(DataError, match="'all' has 1 missing labels of 3"):
        load_raw(cfg.data, task_for("text"), False)


def test_multiple_choice_answers_out_of_range_are_one_clear_error(tmp_path: Path) -> None:
    data = belebele_fixture(tmp_path / "b", rows=8)
    cfg = load_config(PAPER / "belebele.toml", [f'data.name="{data}"', "data.answer_base=0"])
    with pytest.raises(DataError, match=r"allowed: the number of a choice, 0\.\.3"):
        load_raw(cfg.data, task_for("multiple-choice"), False)


@pytest.mark.parametrize("preset", sorted(p.stem for p in PAPER.glob("*.toml")))
def test_every_paper_preset_validates_and_plans_offline(
    preset: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A hub model is not downloaded to plan: its Fisher rounds show the prior, and the plan
    says so (the CPU twin's local model is scored as in a run)."""
    path = str(PAPER / f"{preset}.toml")
    assert main(["validate", path]) == 0
    if preset == "twin":
        return  # builds MiniLM and WordNet to score layers: covered by the twin's own run
    capsys.readouterr()
    assert main(["plan", path, "--rounds", "2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["num_layers"] == 12 and len(plan["rounds"]) == 2
    assert len(plan["rounds"][0]["clients"]) == 10  # 10 of 100 clients per round
    assert plan["fisher_scores_from"].startswith("none")


def test_multiple_choice_without_passage_or_question_is_a_config_error() -> None:
    import fedhello
    from fedhello.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"context_column and data\.question_column"):
        fedhello.load_config(
            None, ['model.task="multiple-choice"', 'data.choice_columns=["a", "b"]']
        )
