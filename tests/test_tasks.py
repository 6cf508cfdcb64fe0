"""Task kinds as parts: the registry's errors, auto-detection, the kinds' config checks, and a
task registered by a user that a federation really uses, end to end on a tiny BERT."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_overrides

import fedhello
import fedhello.tasks
from fedhello.core.config import DataConfig, load_config
from fedhello.core.errors import ConfigError
from fedhello.tasks import TextTask, check_config, detect_task, register_task, task_for, task_names


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations in the test are undone after it (a copy of the registry is patched in)."""
    monkeypatch.setattr(fedhello.tasks, "_TASKS", dict(fedhello.tasks._TASKS))


def test_the_built_in_kinds_are_registered() -> None:
    assert {"text", "image", "multiple-choice"} <= set(task_names())
    assert task_for("image").export_class == "AutoModelForImageClassification"
    assert task_for("multiple-choice").export_class == "AutoModelForMultipleChoice"
    assert not task_for("image").uses_max_length and task_for("text").uses_max_length


def test_an_unknown_task_is_one_line_naming_it_and_the_allowed_names() -> None:
    with pytest.raises(ConfigError) as err:
        task_for("sentiment")
    message = str(err.value)
    assert message == (
        "model.task = 'sentiment': unknown task; allowed: auto, causal-lm, image, "
        "multiple-choice, text"
    )
    with pytest.raises(ConfigError, match="'auto' is resolved from the model's config"):
        task_for("auto")


def test_the_config_takes_any_name_and_the_use_checks_it() -> None:
    """The core's config knows no kinds; ``fedhello.load_config`` (and every command) does."""
    assert load_config(None, ['model.task="sentiment"']).model.task == "sentiment"
    allowed = "'sentiment': unknown task; allowed: auto, causal-lm, image"
    with pytest.raises(ConfigError, match=allowed):
        fedhello.load_config(None, ['model.task="sentiment"'])


def test_the_kinds_own_config_checks_keep_their_messages() -> None:
    cases = {
        ('model.task="multiple-choice"', 'data.choice_columns=["a"]', 'data.context_column="c"'):
            "config: data.choice_columns = ['a']: model.task = 'multiple-choice' needs one "
            "column per answer choice, at least two",
        ('data.choice_columns=["a", "b"]',):
            "config: data.choice_columns = ['a', 'b'] with model.task = 'auto': choice columns "
            "are read only by a multiple-choice task; allowed: model.task = 'multiple-choice', "
            "or no choice_columns",
        ('model.task="multiple-choice"', 'data.choice_columns=["a", "b"]',
         'data.question_column="q"', 'data.text_column=["x", "y"]'):
            "config: data.text_column = ['x', 'y'] with model.task = 'multiple-choice': its "
            "inputs are data.context_column, data.question_column and data.choice_columns; "
            "allowed: leave text_column as one column",
    }  # fmt: skip
    for overrides, message in cases.items():
        cfg = load_config(None, list(overrides))  # the core alone accepts it
        with pytest.raises(ConfigError) as err:
            check_config(cfg)
        assert str(err.value) == message
    image = load_config(None, ['data.choice_columns=["a", "b"]'])
    with pytest.raises(ConfigError, match=r"model\.task = 'auto': choice columns"):
        check_config(image, task_for("image"))  # "auto" resolved to image: its checks


def test_auto_picks_the_first_kind_that_claims_the_model() -> None:
    assert detect_task({"model_type": "vit"}) == "image"
    assert detect_task({"model_type": "bert"}) == "text"
    assert detect_task({}) == "text"


def test_registering_needs_a_named_task_class(registry: None) -> None:
    with pytest.raises(TypeError, match="not a Task subclass"):
        register_task(object)  # type: ignore[type-var]
    with pytest.raises(TypeError, match="needs a class attribute name"):
        register_task(type("Nameless", (TextTask,), {"name": ""}))
    with pytest.raises(TypeError, match="needs a class attribute name"):
        register_task(type("Auto", (TextTask,), {"name": "auto"}))

    @register_task
    class Audio(TextTask):
        name = "audio"

        def detects(self, model_config: Mapping[str, Any]) -> bool:
            return model_config.get("model_type") == "wav2vec2"

    assert isinstance(task_for("audio"), Audio) and "audio" in task_names()
    assert detect_task({"model_type": "wav2vec2"}) == "audio"
    assert detect_task({"model_type": "vit"}) == "image"  # built-ins are asked first


class PrefixedText(TextTask):
    """Every text is read as "topic: <text>": a user's kind in a few lines."""

    name = "prefixed-text"

    def __init__(self) -> None:
        self.encoded: list[str] = []

    def check_config(self, cfg: fedhello.Config) -> None:
        super().check_config(cfg)
        if not isinstance(cfg.data.text_column, str):
            raise ConfigError("config: model.task = 'prefixed-text' reads one text column")

    def read_inputs(self, tables: Mapping[str, Any], cfg: DataConfig) -> Sequence[Any]:
        return [f"topic: {t}" for t in super().read_inputs(tables, cfg)]

    def encode(self, inputs: Sequence[Any], *args: Any) -> Any:
        self.encoded.extend(inputs)
        return super().encode(inputs, *args)


def test_a_registered_task_runs_a_federation_end_to_end(
    registry: None,
    tmp_path: Path,
    tiny_bert_dir: Path,
    tiny_text_csv: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    register_task(PrefixedText)
    overrides = tiny_overrides(
        tiny_bert_dir,
        tiny_text_csv,
        data__text_column='"sentence"',
        data__label_column='"topic"',
        model__task='"prefixed-text"',
    )
    with pytest.raises(ConfigError, match="reads one text column"):  # its own check runs
        fedhello.load_config(None, [*overrides, 'data.text_column=["sentence", "topic"]'])
    cfg = fedhello.load_config(None, overrides)
    caplog.set_level("INFO", logger="fedhello")
    summary = fedhello.run(cfg, out=tmp_path / "run")

    task = task_for("prefixed-text")
    assert isinstance(task, PrefixedText)
    assert len(task.encoded) == 600  # every row of the file, read and encoded by the task
    assert all(t.startswith("topic: ") for t in task.encoded)
    assert any("(prefixed-text, 4 blocks)" in r.getMessage() for r in caplog.records)
    assert summary["rounds"] == 2 and 0 <= summary["test_accuracy"] <= 1


def test_the_evaluation_asks_the_task_for_predictions_and_scores() -> None:
    """A kind scores its own outputs (a generative kind would not use accuracy): the
    evaluation takes the task's predictions and metrics, and adds only the loss and count."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from fedhello.model.evaluation import evaluate
    from fedhello.tasks import TextTask

    class Lowest(TextTask):  # predicts the lowest-scoring class, scores "agreement"
        def predictions(self, logits: torch.Tensor) -> torch.Tensor:
            return logits.argmin(dim=-1)

        def scores(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
            return {"agreement": float((predictions == labels).mean())}

    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])

    class Model(torch.nn.Module):
        def forward(self, rows: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
            return SimpleNamespace(logits=logits[rows], loss=torch.tensor(0.5))

    class Data:
        labels = torch.tensor([0, 1, 1])
        trim = False

        def length_order(self, idx: np.ndarray) -> np.ndarray:
            return np.arange(len(idx))

        def batch(self, idx, augment=None):  # type: ignore[no-untyped-def]
            rows = torch.as_tensor(np.asarray(idx))
            return {"rows": rows, "labels": self.labels[rows]}

    rows = np.arange(3)
    # argmin predicts 0, 1, 0 against labels 0, 1, 1; a classifier's argmax would say 1, 0, 1
    got = evaluate(Model(), Data(), rows, 2, task=Lowest())
    assert got == {"agreement": pytest.approx(2 / 3), "loss": 0.5, "examples": 3}
    plain = evaluate(Model(), Data(), rows, 2, task=TextTask())
    assert plain["accuracy"] == pytest.approx(1 / 3) and "agreement" not in plain
