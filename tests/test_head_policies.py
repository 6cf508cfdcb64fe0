"""Head policies (``train.head``): which tensors a client trains and uploads in each mode, what
the server accepts, FedNCM's class means against numpy (client sums and server head), both
engines' round 0, and tiny federations of each policy (the default bit for bit as before,
resume exact with class means)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import crash_after, tiny_overrides
from flwr.app import Context, Message, RecordDict
from safetensors.numpy import load_file
from test_rank_methods import LAYER_OF, flexlora, global_state, hetlora, upload

from fedhello.cli import main
from fedhello.core.aggregation import ClientUpdate, aggregate_masked, validate_update
from fedhello.core.config import load_config
from fedhello.core.errors import ConfigError, ModelError
from fedhello.core.heads import ClassSums, class_means_head, head_mode
from fedhello.core.layers import AdapterSpec, keys_for_spec, layer_of_keys, lora_factor
from fedhello.data.encoding import ModelInputs
from fedhello.engine.embedded import EmbeddedEngine
from fedhello.engine.experiment import build_experiment
from fedhello.model.class_means import class_feature_sums, linear_head, summed_rows
from fedhello.model.loading import load_model
from fedhello.model.lora import adapter_keys, apply_spec_mask, build_lora_model, get_state
from fedhello.model.training import Shard
from fedhello.store.rerun import without_machine
from fedhello.store.runs import RunDir

HEAD_KEYS = [k for k, layer in LAYER_OF.items() if layer is None]
LABELS = ["class-0", "class-1", "class-2", "class-3"]


# ---- the rule: what a client trains and uploads, what the server accepts ----------------------


def test_head_mode_follows_the_policy_and_the_finetune_rounds() -> None:
    assert [head_mode("federated", r, 4) for r in (1, 4)] == ["federated"] * 2
    assert [head_mode("local", r, 4) for r in (1, 4)] == ["local"] * 2
    assert [head_mode("frozen", r, 4) for r in range(1, 5)] == ["frozen"] * 4
    assert [head_mode("frozen", r, 4, 1) for r in range(1, 5)] == ["frozen"] * 3 + ["federated"]
    assert [head_mode("class-means", r, 3, 3) for r in range(1, 4)] == ["federated"] * 3
    assert [head_mode("class-means", r, 3, 2) for r in range(1, 4)] == [
        "frozen", "federated", "federated",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="allowed: federated, frozen, class-means, local"):
        head_mode("fixed", 1, 3)
    with pytest.raises(ValueError, match="head = 'fixed'"):
        AdapterSpec((0,), head="fixed")


@pytest.mark.parametrize("factors", ["AB", "B"])
def test_keys_per_head_mode(factors: str) -> None:
    """federated: the head is trained and uploaded; frozen: neither; local: trained only. The
    LoRA tensors are the same in every mode."""
    lora = keys_for_spec(LAYER_OF, AdapterSpec((1,), None, factors, "frozen"))
    assert lora and not set(lora) & set(HEAD_KEYS)
    assert keys_for_spec(LAYER_OF, AdapterSpec((1,), None, factors)) == [
        k for k in LAYER_OF if k in lora or k in HEAD_KEYS
    ]
    assert keys_for_spec(LAYER_OF, AdapterSpec((1,), None, factors, "frozen"), trained=True) == lora
    assert keys_for_spec(LAYER_OF, AdapterSpec((1,), None, factors, "local")) == lora
    assert set(
        keys_for_spec(LAYER_OF, AdapterSpec((1,), None, factors, "local"), trained=True)
    ) == set(lora) | set(HEAD_KEYS)


def test_the_server_accepts_the_head_only_where_it_was_asked_for() -> None:
    g = global_state()
    lora = {k: g[k] for k in keys_for_spec(LAYER_OF, AdapterSpec((0,), head="frozen"))}
    head = {k: g[k] for k in HEAD_KEYS}
    for mode in ("frozen", "local"):
        assert validate_update(ClientUpdate(0, (0,), 5, lora, head=mode), g, LAYER_OF) is None
        reason = validate_update(ClientUpdate(0, (0,), 5, lora | head, head=mode), g, LAYER_OF)
        assert f"is the head, not uploaded this round (head {mode})" in str(reason)
    assert "missing 1 allocated" in str(
        validate_update(ClientUpdate(0, (0,), 5, lora), g, LAYER_OF)
    )
    assert validate_update(ClientUpdate(0, (0,), 5, lora | head), g, LAYER_OF) is None


def _drop_head(u: ClientUpdate, mode: str = "frozen") -> ClientUpdate:
    tensors = {k: v for k, v in u.tensors.items() if LAYER_OF[k] is not None}
    return ClientUpdate(u.client, u.layers, u.num_examples, tensors, rank=u.rank, head=mode)


@pytest.mark.parametrize("method", ["masked", "hetlora", "flexlora"])
def test_every_aggregation_keeps_a_head_nobody_uploaded(method: str) -> None:
    """Layer strategies, HetLoRA and FlexLoRA (``accept_with_head``) accept head-less uploads
    and keep the head as it was, bit for bit; the LoRA factors still move."""
    g = global_state(9)
    ups = [_drop_head(upload(0, 3, 10, 1)), _drop_head(upload(1, 4, 30, 2), "local")]
    if method == "masked":
        ups = [ClientUpdate(u.client, u.layers, 5, global_state(u.client + 1)) for u in ups]
        ups = [_drop_head(u) for u in ups]
        new, report = aggregate_masked(g, ups, LAYER_OF, 2)
    else:
        strategy = hetlora() if method == "hetlora" else flexlora()
        new, report, _ = strategy.aggregate(g, ups, LAYER_OF, "shard")
    assert report.accepted == [0, 1]
    for k in HEAD_KEYS:
        np.testing.assert_array_equal(new[k], g[k])
    assert any(not np.array_equal(new[k], g[k]) for k in LAYER_OF if lora_factor(k))


def test_config_refuses_finetune_rounds_without_a_frozen_head() -> None:
    cfg = load_config(None, ['train.head="class-means"', "train.head_finetune_rounds=3",
                             "federation.rounds=3"])  # fmt: skip
    assert cfg.train.head == "class-means" and cfg.train.head_finetune_rounds == 3
    assert (load_config(None).train.head, load_config(None).train.loss) == ("auto", "auto")
    every = load_config(None, ['train.head="class-means"', 'train.head_finetune_rounds="all"'])
    assert [every.train.finetune_rounds(r) for r in (1, 15, 30)] == [1, 15, 30]
    for head in ("federated", "local", "auto"):
        with pytest.raises(
            ConfigError, match=rf"head_finetune_rounds = 1 with train.head = '{head}'"
        ):
            load_config(None, [f'train.head="{head}"', "train.head_finetune_rounds=1"])
    for bad in ("-1", "2.5", '"every"'):  # one line naming the key, not pydantic's union branch
        with pytest.raises(ConfigError, match=r"^config: train.head_finetune_rounds = .*: "
                           r"allowed: a round count 0..federation.rounds, or 'all'$"):  # fmt: skip
            load_config(None, ['train.head="frozen"', f"train.head_finetune_rounds={bad}"])
    with pytest.raises(ConfigError, match=r"head_finetune_rounds = 4 with federation.rounds = 3"):
        load_config(None, ['train.head="frozen"', "train.head_finetune_rounds=4",
                           "federation.rounds=3"])  # fmt: skip
    from fedhello.tasks import check_config

    mc = [
        'model.task="multiple-choice"',
        'data.choice_columns=["a", "b"]',
        'data.question_column="q"',
    ]
    check_config(load_config(None, [*mc, 'train.head="frozen"']))
    check_config(load_config(None, mc))  # auto: federated head, cross-entropy (see below)
    with pytest.raises(ConfigError, match=r"calibration_tau = 2.0 with train.loss = 'auto' and "):
        check_config(load_config(None, [*mc, "train.calibration_tau=2"]))  # auto has no tau here
    with pytest.raises(ConfigError, match=r"class-means' with model.task = 'multiple-choice'"):
        check_config(load_config(None, [*mc, 'train.head="class-means"']))


def test_auto_is_the_skew_recipe_where_it_applies(tiny_bert_dir: Path) -> None:
    """``train.head`` and ``train.loss`` ``auto``: FedNCM-FT with FedLC for a classifier with a
    linear head; the averaged head under DP (round 0's class sums are not accounted) or with a
    head class means cannot build; the plain head and loss for a task without class rows."""
    from fedhello.model.recipe import resolve_recipe
    from fedhello.tasks import task_for

    text, mc, lm = task_for("text"), task_for("multiple-choice"), task_for("causal-lm")
    loaded = load_model(str(tiny_bert_dir), LABELS, pooling="mean")

    def resolved(task: Any, model: Any, *overrides: str) -> tuple[str, int | str, str]:
        t = resolve_recipe(load_config(None, list(overrides)), task, model).train
        return t.head, t.head_finetune_rounds, t.loss

    assert resolved(text, loaded.model) == ("class-means", "all", "logit-adjusted")
    dp = ["privacy.noise_multiplier=1.0", "privacy.clip_norm=1.0"]
    assert resolved(text, loaded.model, *dp) == ("federated", 0, "logit-adjusted")

    class TwoLayerHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.classifier = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))

    assert resolved(text, TwoLayerHead()) == ("federated", 0, "logit-adjusted")
    assert resolved(mc, loaded.model) == resolved(lm, loaded.model) == (
        "federated", 0, "cross-entropy",
    )  # fmt: skip
    # what is set stays as set; a loss set alone keeps the head's auto
    assert resolved(text, loaded.model, 'train.head="frozen"', 'train.loss="cross-entropy"') == (
        "frozen", 0, "cross-entropy",
    )  # fmt: skip
    assert resolved(text, loaded.model, 'train.loss="cross-entropy"')[:2] == ("class-means", "all")


def test_a_run_config_without_head_or_loss_reads_as_it_ran(tmp_path: Path) -> None:
    """A run's config.toml written before ``train.head`` and ``train.loss`` existed ran with the
    averaged head and cross-entropy: it reads so, not as today's auto."""
    import tomli_w

    from fedhello.core.config import load_saved_config

    old = load_config(None, ['train.head="federated"', 'train.loss="cross-entropy"']).to_dict()
    del old["train"]["head"], old["train"]["loss"]
    path = tmp_path / "config.toml"
    path.write_text(tomli_w.dumps(old))
    t = load_saved_config(path).train
    assert (t.head, t.loss) == ("federated", "cross-entropy")


def test_a_comparison_reuses_a_cell_from_before_auto_where_auto_changes_nothing(
    tmp_path: Path, tiny_llama_dir: Path, tiny_alpaca_jsonl: Path, tiny_bert_dir: Path,
    tiny_text_csv: Path,
) -> None:  # fmt: skip
    """A finished cell written with the averaged head and cross-entropy spelled out (every run
    before auto) is reused by a comparison whose config leaves them auto where the task
    settles auto so (a language model); for a classifier auto is the skew recipe: refused."""
    from conftest import lm_overrides

    from fedhello.core.errors import RunDirError
    from fedhello.studies.compare import Cell, run_cell

    plain = ['train.head="federated"', 'train.loss="cross-entropy"']
    cases = [("lm", lm_overrides(tiny_llama_dir, tiny_alpaca_jsonl)),
             ("text", _cfg(tiny_bert_dir, tiny_text_csv))]  # fmt: skip
    for name, ov in cases:
        root, cell = tmp_path / name, Cell("iid", "fedra", 0)
        run = RunDir(cell.path(root))
        run.path.mkdir(parents=True)
        run.write_config(load_config(None, [*ov, *plain]))
        run.write_summary({"precision": "fp32", "base_precision": "fp32"})
        wanted = load_config(None, ov)
        if name == "lm":
            assert run_cell(cell, wanted, root) == "reused"
        else:
            with pytest.raises(RunDirError, match=r"train.head \('federated' -> 'auto'\)"):
                run_cell(cell, wanted, root)


# ---- FedNCM: the client's sums and the server's head against numpy ---------------------------


def _lora_model(model_dir: Path, pooling: str) -> tuple[Any, Any]:
    from test_training import _text_data

    torch.manual_seed(0)
    loaded = load_model(str(model_dir), LABELS, pooling=pooling)
    model = build_lora_model(loaded.model, 4, 8, 0.1, ["auto"])
    return model, _text_data(loaded, 40)


def _perturbed(model: Any) -> dict[str, np.ndarray]:
    """A global state with non-zero B factors: the LoRA tensors change the features."""
    rng = np.random.default_rng(3)
    state = get_state(model, adapter_keys(model))
    return {k: (v + rng.normal(0, 0.2, v.shape)).astype(v.dtype) for k, v in state.items()}


@torch.no_grad()
def _features_by_hand(model: Any, data: ModelInputs, rows: np.ndarray, pooling: str) -> np.ndarray:
    """The head's input computed from the encoder, not through the head: the masked mean of
    the token states (float64, numpy), or BERT's pooler output."""
    model.eval()
    batch = data.batch(rows)
    batch.pop("labels")
    inner = model.get_base_model()
    if pooling == "head":
        return inner.bert(**batch).pooler_output.double().numpy()
    h = inner.encoder(**batch).last_hidden_state.double().numpy()
    m = batch["attention_mask"].double().numpy()[..., None]
    return (h * m).sum(axis=1) / m.sum(axis=1)


@pytest.mark.parametrize("pooling", ["mean", "head"])
def test_client_class_sums_against_numpy(pooling: str, tiny_bert_dir: Path) -> None:
    """Per class, the sum of the head's inputs (eval mode, the sent state) and the count;
    a capped shard sums a seeded subset of rows the size of the cap."""
    model, data = _lora_model(tiny_bert_dir, pooling)
    state = _perturbed(model)
    rows = np.arange(3, 37)
    sums, counts = class_feature_sums(model, Shard(data, rows), state, 8, seed=5, client=2)
    feats = _features_by_hand(model, data, rows, pooling)
    labels = data.labels.numpy()[rows]
    want = np.stack([feats[labels == c].sum(axis=0) for c in range(len(LABELS))])
    assert sums.dtype == np.float64 and counts.tolist() == np.bincount(labels, minlength=4).tolist()
    np.testing.assert_allclose(sums, want, rtol=1e-5, atol=1e-6)
    assert not model.training
    # the cap: 2 batches of 8 rows, a seeded subset of the shard, the same on every call
    picked = summed_rows(rows, 8, 5, 2, max_batches=2)
    assert len(picked) == 16 and set(picked) <= set(rows)
    assert np.array_equal(picked, summed_rows(rows, 8, 5, 2, max_batches=2))
    capped, n = class_feature_sums(model, Shard(data, rows), state, 8, seed=5, client=2,
                                   max_batches=2)  # fmt: skip
    sub = np.isin(rows, picked)
    want = np.stack([feats[sub & (labels == c)].sum(axis=0) for c in range(4)])
    np.testing.assert_allclose(capped, want, rtol=1e-5, atol=1e-6)
    assert n.sum() == 16


def test_a_head_that_is_not_linear_is_refused() -> None:
    class TwoLayerHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.classifier = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))

    with pytest.raises(ModelError, match="class-means' with a Sequential head"):
        linear_head(TwoLayerHead())


def test_server_head_from_class_sums_against_numpy() -> None:
    """w_c = mu_c / ||mu_c|| with mu_c = sum_k s_kc / sum_k n_kc, bias 0; a class nobody holds
    keeps its initial row and bias; malformed sums are left out with a reason."""
    rng = np.random.default_rng(0)
    w, b = "classifier.modules_to_save.default.weight", "classifier.modules_to_save.default.bias"
    layer_of = {"enc.layer.0.q.lora_A.default.weight": 0, w: None, b: None}
    state = {
        "enc.layer.0.q.lora_A.default.weight": rng.normal(size=(2, 5)).astype(np.float32),
        w: rng.normal(size=(4, 5)).astype(np.float32),
        b: rng.normal(size=4).astype(np.float32),
    }
    s1, s2 = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    n1, n2 = np.array([3, 0, 2, 0]), np.array([1, 0, 0, 4])
    s1[1] = s1[3] = s2[1] = s2[2] = 0  # no examples, no sum
    bad = ClassSums(7, np.ones((3, 5)), np.ones(3, dtype=np.int64))
    new, info = class_means_head(state, layer_of, [ClassSums(2, s2, n2), bad, ClassSums(0, s1, n1)])
    for c in (0, 2, 3):
        mu = (s1[c] + s2[c]) / (n1[c] + n2[c])
        np.testing.assert_allclose(new[w][c], mu / np.linalg.norm(mu), rtol=1e-6)
        assert new[b][c] == 0
    np.testing.assert_array_equal(new[w][1], state[w][1])  # nobody holds class 1
    assert new[b][1] == state[b][1] and new[w].dtype == np.float32
    assert (
        new["enc.layer.0.q.lora_A.default.weight"] is state["enc.layer.0.q.lora_A.default.weight"]
    )
    assert info["clients"] == [0, 2] and info["examples"] == 10 and info["classes_built"] == 3
    assert info["classes_kept"] == [1] and "expected [4, 5]" in info["rejected"]["7"]
    with pytest.raises(ValueError, match="needs a linear head"):
        class_means_head(state | {"extra": np.ones((4, 5))}, layer_of | {"extra": None}, [])
    # a node that sends sums for a class it counted 0 times (class 3, which others hold) would
    # move that class's mean without adding to its count: left out, the head as without it
    lie = np.zeros((4, 5))
    lie[3] = 100.0
    liar = ClassSums(9, lie, np.zeros(4, dtype=np.int64))
    again, info = class_means_head(
        state, layer_of, [ClassSums(2, s2, n2), liar, ClassSums(0, s1, n1)]
    )
    np.testing.assert_array_equal(again[w], new[w])
    assert "counted 0 times" in info["rejected"]["9"]


# ---- round 0 on both engines, and the training of each mode ----------------------------------


def test_a_frozen_or_local_head_trains_as_asked(tiny_bert_dir: Path) -> None:
    """frozen: the head has no gradient and is not uploaded; local: trained, not uploaded."""
    from test_training import _text_data

    from fedhello.model.training import LocalTask, train_client

    torch.manual_seed(0)
    loaded = load_model(str(tiny_bert_dir), LABELS)
    model = build_lora_model(loaded.model, 4, 8, 0.1, ["auto"])
    data = _text_data(loaded, 32)
    keys = adapter_keys(model)
    layer_of = layer_of_keys(keys, 4)
    head = [k for k in keys if layer_of[k] is None]
    cfg = load_config(None, ["train.local_steps=3", "train.batch_size=8"])
    state = get_state(model, keys)
    for mode in ("frozen", "local"):
        spec = AdapterSpec((2,), head=mode)
        trainable = {id(p) for p in apply_spec_mask(model, spec, layer_of)}
        params = dict(model.named_parameters())
        assert all((id(params[k]) in trainable) == (mode == "local") for k in head)
        task = LocalTask(0, 1, spec, 1e-2, 0)
        result = train_client(model, layer_of, Shard(data, np.arange(32)), task, state, cfg.train)
        assert not set(result.update.tensors) & set(head) and result.update.head == mode
        assert validate_update(result.update, state, layer_of) is None
        moved = get_state(model, head)
        same = all(np.array_equal(moved[k], state[k]) for k in head)
        assert same == (mode == "frozen")


def _cfg(model: Path, data: Path, **extra: object) -> list[str]:
    return tiny_overrides(model, data, data__text_column='"sentence"', data__label_column='"topic"',
                          data__partition='"pathological"', data__classes_per_client=2,
                          run__keep_checkpoints=5, **extra)  # fmt: skip


def _run(out: Path, overrides: list[str]) -> list[dict]:
    args = ["run", "--out", str(out)]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 0
    return RunDir(out).read_metrics()


def _heads(out: Path) -> list[dict[str, np.ndarray]]:
    """The global head after each round (from the checkpoints)."""
    paths = sorted((out / "checkpoints").glob("round-*.safetensors"))
    return [{k: v for k, v in load_file(str(p)).items() if ".modules_to_save." in k} for p in paths]


def _initial_head(overrides: list[str]) -> dict[str, np.ndarray]:
    exp = build_experiment(load_config(None, overrides), encode_data=False)
    return {k: v for k, v in exp.init_state.items() if exp.layer_of[k] is None}


def _equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_tiny_federations_of_each_head_policy(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    """3 rounds x 3 clients on 2 classes each. The default (auto) is FedNCM-FT with FedLC
    spelled out, bit for bit, and the summary says so while config.toml keeps auto; frozen
    keeps the initial head, and with one fine-tuning round changes it only in
    the last; local never changes the global head while its clients train it (their round-1
    loss is federated's, below frozen's); class-means builds the head before round 1, as the
    embedded engine's sums say, and records it."""
    base = _cfg(tiny_bert_dir, tiny_text_csv, federation__rounds=3)
    init = _initial_head(base)
    runs: dict[str, list[dict]] = {}
    plain = {"train__head": '"federated"', "train__loss": '"cross-entropy"'}
    settings = {
        "default": {},
        "recipe": {"train__head": '"class-means"', "train__head_finetune_rounds": '"all"',
                   "train__loss": '"logit-adjusted"'},
        "federated": plain,
        "frozen": {"train__head": '"frozen"'},
        "finetune": {"train__head": '"frozen"', "train__head_finetune_rounds": 1},
        "local": {"train__head": '"local"'}, "class-means": {"train__head": '"class-means"'},
    }  # fmt: skip
    for name in ("frozen", "finetune", "local", "class-means"):  # the loss of federated's
        settings[name]["train__loss"] = '"cross-entropy"'
    for name, extra in settings.items():
        runs[name] = _run(tmp_path / name, _cfg(tiny_bert_dir, tiny_text_csv,
                                                federation__rounds=3, **extra))  # fmt: skip
    assert without_machine(runs["recipe"]) == without_machine(runs["default"])
    summary = RunDir(tmp_path / "default").read_summary()
    assert (summary["head"], summary["head_finetune_rounds"], summary["loss"]) == (
        "class-means", 3, "logit-adjusted",
    )  # fmt: skip
    saved = (tmp_path / "default" / "config.toml").read_text()
    assert 'head = "auto"' in saved and 'loss = "auto"' in saved
    assert [r["head"] for r in runs["default"]] == ["federated"] * 3
    assert runs["default"][0]["class_means"]["classes_built"] == 4
    assert runs["default"][0]["train_loss"] != runs["federated"][0]["train_loss"]
    assert "head" not in runs["federated"][0]
    assert all(not _equal(h, init) for h in _heads(tmp_path / "federated"))
    # frozen: the initial head, bit for bit, in every round and in the final adapter
    assert [r["head"] for r in runs["frozen"]] == ["frozen"] * 3
    assert all(_equal(h, init) for h in _heads(tmp_path / "frozen"))
    adapter = load_file(str(tmp_path / "frozen" / "adapter" / "adapter_model.safetensors"))
    head_w = next(v for k, v in adapter.items() if "classifier" in k and k.endswith("weight"))
    np.testing.assert_array_equal(head_w, next(v for k, v in init.items() if k.endswith("weight")))
    # one fine-tuning round: frozen in rounds 1-2, trained and averaged in round 3 only
    assert [r["head"] for r in runs["finetune"]] == ["frozen", "frozen", "federated"]
    assert [_equal(h, init) for h in _heads(tmp_path / "finetune")] == [True, True, False]
    # local: the global head stays initial; clients train it (round 1 is federated's)
    assert all(_equal(h, init) for h in _heads(tmp_path / "local"))
    assert runs["local"][0]["train_loss"] == runs["federated"][0]["train_loss"]
    assert all(
        loc["train_loss"] < fro["train_loss"]
        for loc, fro in zip(runs["local"], runs["frozen"], strict=True)
    )
    up = runs["federated"][1]["clients"][0]["bytes_up"]
    assert runs["local"][1]["clients"][0]["bytes_up"] < up
    # class-means: built at round 0 from every client's sums, then frozen
    first = runs["class-means"][0]
    assert first["head"] == "frozen" and first["class_means"]["clients"] == list(range(6))
    assert (
        first["class_means"]["classes_built"] == 4 and "class_means" not in runs["class-means"][1]
    )
    exp = build_experiment(load_config(None, base))
    sums, failed = EmbeddedEngine().class_sums(exp, exp.init_state)
    built, _ = class_means_head(exp.init_state, exp.layer_of, sums)
    assert not failed and sum(int(s.counts.sum()) for s in sums) == first["class_means"]["examples"]
    want = {k: v for k, v in built.items() if exp.layer_of[k] is None}
    assert all(_equal(h, want) for h in _heads(tmp_path / "class-means"))
    weight = next(v for k, v in want.items() if k.endswith("weight"))
    np.testing.assert_allclose(np.linalg.norm(weight, axis=1), 1.0, rtol=1e-6)


def test_class_means_resumes_exactly_without_recomputing_round_0(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A class-means run with fine-tuning, crashed after round 1's checkpoint, resumes to the
    uninterrupted run's metrics and state; its round 0 is in the checkpointed state, not
    recomputed (the engine's class sums are never asked for again)."""
    ov = _cfg(tiny_bert_dir, tiny_text_csv, federation__rounds=3, train__head='"class-means"',
              train__head_finetune_rounds=2, federation__server_optimizer='"fedadam"')  # fmt: skip
    ref = tmp_path / "ref"
    records = _run(ref, ov)
    assert [r["head"] for r in records] == ["frozen", "federated", "federated"]
    crashed = crash_after(ref, tmp_path / "crashed", 1)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("round 0 recomputed on resume")

    monkeypatch.setattr(EmbeddedEngine, "class_sums", forbidden)
    assert main(["run", "--resume", str(crashed)]) == 0
    assert RunDir(crashed).read_summary()["resumed_at_round"] == 2
    ours = [without_machine(r) for r in RunDir(crashed).read_metrics()]
    assert ours == [without_machine(r) for r in RunDir(ref).read_metrics()]
    a = load_file(str(ref / "checkpoints" / "round-000003.safetensors"))
    b = load_file(str(crashed / "checkpoints" / "round-000003.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a Flower process sets before it builds messages (here: called directly)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


class LoopbackGrid:
    """A grid whose nodes are this process's ClientApp handlers (one Context per node)."""

    def __init__(self, contexts: dict[int, Context]) -> None:
        self.contexts = contexts

    def send_and_receive(self, messages: list[Message], timeout: float | None = None) -> list:
        from fedhello.engine.flower import client_app

        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node == 102:  # a node whose handler fails: an error reply
                continue
            assert msg.metadata.message_type == "query.class_means"
            replies.append(client_app.class_means(msg, self.contexts[node]))
        return replies


def test_round_0_on_flower_equals_the_embedded_engine(
    task_identity: None, tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    """The Flower engine asks every partition node for its sums (``query.class_means``, its
    rows sent); they equal the embedded engine's; a silent node is a failure, named."""
    from fedhello.engine.flower.engine import FlowerEngine

    cfg = load_config(None, _cfg(tiny_bert_dir, tiny_text_csv, train__head='"class-means"'))
    exp = build_experiment(cfg)
    n = cfg.clients.num_clients
    contexts = {
        100 + c: Context(run_id=1, node_id=100 + c, node_config={"partition-id": c},
                         state=RecordDict(), run_config={})
        for c in range(n)
    }  # fmt: skip
    engine = FlowerEngine(LoopbackGrid(contexts))  # type: ignore[arg-type]
    engine.node_of = {c: 100 + c for c in range(n)}
    engine.config_toml, engine.label_names = cfg.to_toml(), list(exp.raw.label_names)
    engine.shards = list(exp.shards)
    theirs, failed = engine.class_sums(exp, exp.init_state)
    ours, _ = EmbeddedEngine().class_sums(exp, exp.init_state)
    assert failed == {2: "no reply before the round's timeout"}
    assert [s.client for s in theirs] == [c for c in range(n) if c != 2]
    for s in theirs:
        np.testing.assert_array_equal(s.counts, ours[s.client].counts)
        np.testing.assert_allclose(s.sums, ours[s.client].sums, rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_class_means_on_the_flower_simulation_equals_embedded(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path
) -> None:
    """Round 0 as ``query.class_means`` messages, then frozen and fine-tuned rounds (the head
    mode on the wire): the Flower simulation's run is the embedded engine's."""
    from test_flower import _overrides, assert_same_adapter
    from test_flower import _run as run_flower

    ov = _overrides(tiny_bert_dir, tiny_text_csv, train__head='"class-means"',
                    train__head_finetune_rounds=1)  # fmt: skip
    emb, sim = tmp_path / "emb", tmp_path / "sim"
    assert run_flower(emb, ov) == 0
    assert run_flower(sim, ov, "--engine", "flower-sim") == 0
    assert_same_adapter(emb, sim)
    ours = [without_machine(r) for r in RunDir(sim).read_metrics()]
    assert ours == [without_machine(r) for r in RunDir(emb).read_metrics()]
    assert [r["head"] for r in ours] == ["frozen", "federated"]
    assert ours[0]["class_means"]["clients"] == [0, 1, 2]


def test_a_comparisons_strategies_of_one_seed_share_round_zero_bit_for_bit(
    tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path, counted_class_sums: list[int]
) -> None:
    """FedNCM's round 0 depends on the data, shards, model and initial state, not on the
    strategy: a comparison computes it once per seed and reuses it, and the reusing run's
    metrics equal the same run made alone (timing aside)."""
    computed = counted_class_sums
    ov = tiny_overrides(tiny_bert_dir, tiny_text_csv, data__text_column='"sentence"',
                        data__label_column='"topic"', train__head='"class-means"')  # fmt: skip
    root = tmp_path / "c"
    args = ["compare", "--strategies", "fedra,full", "--seeds", "0", "--partitions", "iid",
            "--out", str(root)]  # fmt: skip
    for o in ov:
        args += ["--set", o]
    assert main(args) == 0
    # fedra's six clients, then the centralised reference's one; full reused fedra's
    assert computed == [0, 1, 2, 3, 4, 5, 0]
    cell = RunDir(root / "runs" / "iid" / "full" / "seed0")
    alone = tmp_path / "alone"
    assert main(["run", str(cell.config_path), "--out", str(alone)]) == 0
    assert computed[-6:] == [0, 1, 2, 3, 4, 5]  # computed again, without a shared cache
    assert without_machine(RunDir(alone).read_metrics()) == without_machine(cell.read_metrics())
