"""Zero-shot and few-shot: the scores against a direct computation on the tiny models (cosines in float64 from the
BERT's own states; label log-likelihoods from the GPT's own logits), the examples a few-shot run draws, and the runs
`finetune` makes of them, which `predict` reads and `compare` tabulates."""

import json

import pytest
import torch
import torch.nn.functional as F

from tests.train.finetune_fixtures import make_env
from tinygraft.cli.main import main
from tinygraft.data import labeled as L
from tinygraft.models.heads import TaskModel
from tinygraft.models.pretrained import load_pretrained_model, load_tokenizer
from tinygraft.tasks import make_head
from tinygraft.train.methods import make_method
from tinygraft.train.methods.base import FitData
from tinygraft.train.methods.noshot import draw

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["asyncio", "logging"]  # the tiny env's classes, in label-map order
TEXTS = {"asyncio": "coroutines and the event loop", "logging": "records written by a logger"}
TRAIN = [("run the event loop", 0), ("await a task", 0), ("a future result", 0), ("log a warning", 1),
         ("the root logger", 1), ("a log handler", 1), ("format a record", 1)]  # fmt: skip
QUERIES = ["schedule a coroutine", "emit a record", "a handler with a level of debug", "x"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("noshot"))


def tiny(env, family: str, pooling: str | None = None):
    """(TaskModel with a fresh classify head, tokenizer, backbone) of the env's tiny BERT or GPT."""
    backbone = load_pretrained_model(env[family], family).eval()
    tok = load_tokenizer(env[family])
    settings = {"pooling": pooling} if pooling else {}
    return TaskModel(backbone, make_head("classify", backbone, num_labels=2, **settings)), tok, backbone


def fit_data(tok, pairs=TRAIN, seed=0, max_length=64) -> FitData:
    examples = [L.Example(t, None, NAMES[y], i + 2) for i, (t, y) in enumerate(pairs)]
    feats = L.encode_classification(examples, tok, max_length, L.LabelMap(NAMES))
    return FitData("classify", None, NAMES, feats, [ex.line for ex in examples], tok, max_length, 3,
                   tok.pad_id or 0, seed, torch.device("cpu"))  # fmt: skip


def fitted(model, name: str, data: FitData, **settings):
    method = make_method(name, settings, "finetune")
    method.fit(model, data)
    return method, method.attach(model).eval()


def logits(model, tok, texts: list[str]) -> torch.Tensor:
    feats = L.encode_classification([L.Example(t, None, None, 0) for t in texts], tok, 64)
    with torch.no_grad():
        return torch.cat([model(b)[0]["logits"] for b in L.eval_batches(feats, 3, tok.pad_id or 0)])


# ----------------------------------------------------------------------------------------- by hand, float64
def bert_vector(backbone, tok, text: str, pooling: str) -> torch.Tensor:
    ids, types = tok.encode_for_model(text, max_length=64)
    ids, types = torch.tensor([ids]), torch.tensor([types])
    out = backbone(ids, torch.ones_like(ids), types)
    h = out.last_hidden_state[0].double()
    return {"mean": h.mean(0), "cls": h[0], "pooler": out.pooled[0].double()}[pooling]


def cosines(queries: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    return F.normalize(queries, dim=-1) @ F.normalize(vectors, dim=-1).T


def label_logprob(gpt, prompt: list[int], label: list[int]) -> list[float]:
    """log p(label token j | prompt, label tokens before j), token by token, from the GPT's logits."""
    ids = torch.tensor([prompt + label])
    logp = gpt(ids)[0][0].double().log_softmax(-1)  # (T, V)
    return [float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(label)]


# --------------------------------------------------------------------------------------------------- BERT
@pytest.mark.parametrize("pooling", ["mean", "cls", "pooler"])
def test_bert_zero_shot_is_the_cosine_to_each_label_text(env, pooling):
    model, tok, bb = tiny(env, "bert", pooling)
    _, model = fitted(model, "zero-shot", fit_data(tok), label_text=[f"{n}={t}" for n, t in TEXTS.items()])
    with torch.no_grad():
        labels = torch.stack([bert_vector(bb, tok, TEXTS[n], pooling) for n in NAMES])
        queries = torch.stack([bert_vector(bb, tok, q, pooling) for q in QUERIES])
    expected = cosines(queries, labels)
    torch.testing.assert_close(logits(model, tok, QUERIES).double(), expected, rtol=0, atol=1e-5)


def test_a_label_without_a_text_is_scored_by_its_name(env):
    model, tok, bb = tiny(env, "bert", "mean")
    method, model = fitted(model, "zero-shot", fit_data(tok), label_text="logging=log records")
    assert method.describe()["label_texts"] == {"asyncio": "asyncio", "logging": "log records"}
    with torch.no_grad():
        labels = torch.stack([bert_vector(bb, tok, t, "mean") for t in ("asyncio", "log records")])
        expected = cosines(torch.stack([bert_vector(bb, tok, q, "mean") for q in QUERIES]), labels)
    torch.testing.assert_close(logits(model, tok, QUERIES).double(), expected, rtol=0, atol=1e-5)


def test_bert_few_shot_is_the_cosine_to_each_class_prototype(env):
    model, tok, bb = tiny(env, "bert", "mean")
    method, model = fitted(model, "few-shot-2", fit_data(tok, seed=5), label_text="asyncio=unused by prototypes")
    picked = draw([y for _, y in TRAIN], 2, 2, seed=5, per_class=True)
    assert method.describe()["examples"] == [{"line": i + 2, "label": NAMES[TRAIN[i][1]]} for i in picked]
    with torch.no_grad():
        unit = {i: F.normalize(bert_vector(bb, tok, TRAIN[i][0], "mean"), dim=0) for i in picked}
        prototypes = torch.stack([torch.stack([unit[i] for i in picked if TRAIN[i][1] == c]).mean(0) for c in (0, 1)])
        expected = cosines(torch.stack([bert_vector(bb, tok, q, "mean") for q in QUERIES]), prototypes)
    torch.testing.assert_close(logits(model, tok, QUERIES).double(), expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- GPT
@pytest.mark.parametrize("score", ["sum", "mean"])
def test_gpt_zero_shot_is_the_label_texts_log_likelihood_after_the_template(env, score):
    model, tok, gpt = tiny(env, "gpt")
    template = "Text: {text}\\nTopic:"  # as typed on a command line: \n is a newline
    _, model = fitted(model, "zero-shot", fit_data(tok), label_text=[f"{n}={t}" for n, t in TEXTS.items()],
                      template=template, label_score=score)  # fmt: skip
    with torch.no_grad():
        expected = []
        for q in QUERIES:
            prompt = tok.encode("Text: ") + tok.encode(q) + tok.encode("\nTopic:")
            per_token = [label_logprob(gpt, prompt, tok.encode(" " + TEXTS[n])) for n in NAMES]
            expected.append([sum(lp) / (len(lp) if score == "mean" else 1) for lp in per_token])
    assert len(tok.encode(" " + TEXTS["asyncio"])) > 1  # several label tokens: sum and mean differ
    torch.testing.assert_close(logits(model, tok, QUERIES).double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=0, atol=1e-4)  # fmt: skip


def test_gpt_few_shot_reads_k_examples_with_the_template_before_the_text(env):
    model, tok, gpt = tiny(env, "gpt")
    texts = {"asyncio": "loop", "logging": "log"}
    given = [f"{n}={t}" for n, t in texts.items()]
    method, model = fitted(model, "few-shot-3", fit_data(tok, seed=1), label_text=given, template="{text}:")
    picked = draw([y for _, y in TRAIN], 2, 3, seed=1, per_class=False)
    assert [d["line"] for d in method.describe()["examples"]] == [i + 2 for i in picked]
    context = []
    for i in picked:
        text, y = TRAIN[i]
        context += tok.encode(text) + tok.encode(":") + tok.encode(" " + texts[NAMES[y]]) + tok.encode("\n\n")
    with torch.no_grad():
        expected = []
        for q in QUERIES:
            prompt = context + tok.encode(q) + tok.encode(":")
            assert len(prompt) + 3 < 64  # the whole context is read: nothing is cut
            expected.append([sum(label_logprob(gpt, prompt, tok.encode(" " + texts[n]))) for n in NAMES])
    torch.testing.assert_close(logits(model, tok, QUERIES).double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=0, atol=1e-4)  # fmt: skip


def test_a_context_past_the_models_positions_keeps_its_last_tokens(env):
    model, tok, gpt = tiny(env, "gpt")
    long = [(" ".join(["the event loop"] * 6), y) for y in (0, 1) for _ in range(4)]
    data = fit_data(tok, long, seed=0)
    method = make_method("few-shot-8", {}, "finetune")
    notes = method.fit(model, data)
    assert any("positions" in n and "earliest examples are cut" in n for n in notes)
    model = method.attach(model).eval()
    head = model.head
    with torch.no_grad():
        expected = []
        for q in QUERIES[:2]:
            row = []
            for n in NAMES:
                label = tok.encode(" " + n)
                seq = (head.before.tolist() + tok.encode(q) + tok.encode("\nLabel:") + label)[-64:]
                row.append(sum(label_logprob(gpt, seq[: -len(label)], label)))
            expected.append(row)
    torch.testing.assert_close(logits(model, tok, QUERIES[:2]).double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=0, atol=1e-4)  # fmt: skip


# ---------------------------------------------------------------------------------------------- the draw
def test_few_shot_draws_k_per_class_from_the_seed_alone():
    labels = [i % 3 for i in range(30)]
    a = draw(labels, 3, 4, seed=7, per_class=True)
    assert a == draw(labels, 3, 4, seed=7, per_class=True)
    assert [sum(labels[i] == c for i in a) for c in range(3)] == [4, 4, 4] and len(set(a)) == 12
    assert any(draw(labels, 3, 4, seed=s, per_class=True) != a for s in range(1, 4))
    few = [0] * 10 + [1] * 2
    assert sorted(i for i in draw(few, 2, 4, seed=0, per_class=True) if few[i] == 1) == [10, 11]  # all it has


def test_a_gpt_context_of_k_is_balanced_where_the_data_allows():
    labels = [i % 2 for i in range(20)]
    picked = draw(labels, 2, 5, seed=3, per_class=False)
    assert picked == draw(labels, 2, 5, seed=3, per_class=False) and len(set(picked)) == 5
    assert sorted(sum(labels[i] == c for i in picked) for c in (0, 1)) == [2, 3]
    scarce = [0] * 10 + [1]
    picked = draw(scarce, 2, 6, seed=0, per_class=False)
    assert sum(scarce[i] == 1 for i in picked) == 1 and len(picked) == 6


# ------------------------------------------------------------------------------------------- the commands
def cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def finetune_args(env, family, out, *extra):
    return ["finetune", "--from", env[family], "--train", env["train"], "--val", env["val"], "--out", out,
            "--max-length", 32, "--batch-size", 8, *extra]  # fmt: skip


@pytest.mark.parametrize(("family", "method"), [("bert", "zero-shot"), ("gpt", "few-shot-4")])
def test_finetune_makes_a_run_that_predict_reads(env, tmp_path, capsys, family, method):
    out = tmp_path / "run"
    extra = ["--label-text", "asyncio=coroutines and event loops", "--label-text", "logging=log records"]
    code, _, err = cli(finetune_args(env, family, out, "--method", method, *extra), capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 0 and results["best_step"] == 0 and results["status"] == "completed"
    assert results["trainable_params"] == 0 and results["optimizer_state_mb"] == 0.0 and results["lr"] == 0.0
    state = json.loads((out / "checkpoints" / "step-00000000" / "trainer_state.json").read_text())
    assert results["train_seconds"] >= state["fit_seconds"] > 0  # its training time is building the scorer
    settings = results["method_settings"]
    assert settings["label_texts"]["logging"] == "log records"
    if method == "few-shot-4":
        assert len(settings["examples"]) == 4 and sorted(e["label"] for e in settings["examples"]) == [
            "asyncio", "asyncio", "logging", "logging"]  # fmt: skip
        rows = env["train"].read_text().splitlines()
        assert all(rows[e["line"] - 1].endswith("\t" + e["label"]) for e in settings["examples"])
    code, got, err = cli(["predict", out, "--input", env["val"]], capsys)
    assert code == 0, err
    preds = [json.loads(line) for line in got.splitlines()]
    gold = [line.split("\t")[1] for line in env["val"].read_text().splitlines()[1:]]
    assert len(preds) == len(gold) and {p["label"] for p in preds} <= set(NAMES)
    accuracy = sum(p["label"] == g for p, g in zip(preds, gold)) / len(gold)
    assert accuracy == pytest.approx(results["metrics"]["accuracy"])  # the saved scorer is the evaluated one


def test_compare_tabulates_no_training_beside_a_probe(env, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--from", env["bert"], "--train", env["train"], "--val", env["val"], "--out", out,
            "--steps", 2, "--batch-size", 8, "--max-length", 32, "--threads", 1, "--seeds", "0",
            "--methods", "zero-shot,few-shot-4,linear-probe", "--label-text", "logging=log records"]  # fmt: skip
    code, o, err = cli(args, capsys)
    assert code == 0, err
    rows = {r["method"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert list(rows) == ["zero-shot", "few-shot-4", "linear-probe"]
    for name in ("zero-shot", "few-shot-4"):
        assert rows[name]["trainable_params"] == 0 and rows[name]["steps"] == 0 and rows[name]["lr"] == 0.0
        assert 0.0 <= rows[name]["mean"] <= 1.0 and rows[name]["train_seconds"] > 0
    assert rows["linear-probe"]["trainable_params"] > 0 and rows["linear-probe"]["steps"] > 0
    assert "| few-shot-4 |" in (out / "compare.md").read_text() and "(no training)" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "zero-shot", "--label-text", "asyncoi=event loops"], "names label 'asyncoi', which the training"),
        (["--method", "zero-shot", "--label-text", "asyncio"], "must be LABEL=TEXT"),
        (["--method", "few-shot-0"], "--shots must be at least 1, got 0"),
        (["--method", "zero-shot", "--template", "no text here"], "must hold {text} once"),
        (["--method", "zero-shot", "--problem", "multi_label"], "use it with --problem single_label"),
    ],
)
def test_bad_input_is_one_sentence_and_leaves_no_run(env, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    code, _, err = cli(finetune_args(env, "bert", out, *extra), capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (out / "config.json").exists()
