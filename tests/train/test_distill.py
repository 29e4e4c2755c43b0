"""`tinygraft distill` end to end on tiny models: a language-model teacher (a GPT run) and a fine-tuned one (a BERT
on the docstring demo); resume exact; the teacher cache equal to the teacher; the run usable by predict, export,
info; and every refusal one sentence."""

import json

import pytest
import torch

from tests.cli.tiny_runs import run_cli as run
from tests.cli.tiny_runs import write_corpus
from tests.train.finetune_fixtures import demo_rows, make_bert_dir, make_data, make_gpt_dir, write_tsv
from tinygraft.cli.main import main
from tinygraft.core import checkpoint
from tinygraft.data import labeled as L
from tinygraft.kernels.kd_loss import kd_divergence
from tinygraft.models.bert import BERTConfig, BERTForMaskedLM
from tinygraft.models.gpt import GPT, GPTConfig
from tinygraft.models.heads import TaskModel
from tinygraft.models.student import student_from_teacher
from tinygraft.tasks.lm import CausalLM, MaskedLM
from tinygraft.train import distill, runs
from tinygraft.train.config import DistillSettings

pytestmark = pytest.mark.usefixtures("one_thread")

GPT_SIZES = ["--preset", "gpt-tiny", "--set", "model.n_head=2", "--set", "model.n_layer=2", "--set",
             "model.n_embd=32", "--set", "data.vocab_size=300"]  # fmt: skip
LM_SCHEDULE = ["--set", "train.seq_len=16", "--set", "train.batch_size=2", "--set", "train.eval_every=3",
               "--set", "train.eval_batches=1", "--set", "train.warmup_steps=1"]  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    corpus = write_corpus(root / "corpus.txt")
    assert main([str(a) for a in ["pretrain", "--out", root / "gpt", "--data", corpus, *GPT_SIZES, *LM_SCHEDULE,
                                   "--steps", 6]]) == 0  # fmt: skip
    train, val = demo_rows()
    two = [r for r in train if r[1] in ("logging", "asyncio")][:40]
    files = {
        "train": write_tsv(root / "a.tsv", ["text", "label"], two),
        "val": write_tsv(root / "a_val.tsv", ["text", "label"], [r for r in val if r[1] in ("logging", "asyncio")]),
    }
    bert = make_bert_dir(root, [t for t, _ in train] * 2)
    other_gpt = make_gpt_dir(root, [t for t, _ in train] * 2)  # a tokenizer of its own
    task = ["--train", files["train"], "--val", files["val"], "--batch-size", 8, "--max-length", 32]
    assert main([str(a) for a in ["finetune", "--from", bert, "--out", root / "ft", *task, "--steps", 5]]) == 0
    return {
        "root": root,
        "corpus": corpus,
        "bert": bert,
        "task": task,
        "gpt": root / "gpt",
        "ft": root / "ft",
        "other_gpt": other_gpt,
        **files,
    }


def lm_args(env, out, *extra):
    return ["distill", "--teacher", env["gpt"], "--data", env["corpus"], "--out", out, *LM_SCHEDULE, "--steps", 6,
            *extra]  # fmt: skip


def task_args(env, out, *extra):
    return ["distill", "--teacher", env["ft"], "--out", out, *env["task"], "--steps", 6, "--eval-every", 3, *extra]


def final_weights(out):
    return checkpoint.load(out).model


@pytest.mark.parametrize("student", [
    ["--student-from-teacher", "1", "--hidden-weight", 1, "--attention-weight", 1],
    ["--student", "gpt-tiny", "--set", "model.n_layer=1", "--set", "model.n_head=1", "--set", "model.n_embd=16",
     "--hidden-weight", 1, "--divergence", "jsd"],
])  # fmt: skip
def test_lm_distillation_resumes_exactly(env, tmp_path, capsys, student):
    straight, parted = tmp_path / "straight", tmp_path / "parted"
    assert run(lm_args(env, straight, *student), capsys)[0] == 0
    assert run(lm_args(env, parted, *student, "--stop-at", 3), capsys)[0] == 0
    code, out, _ = run(["distill", "--out", parted, "--resume"], capsys)
    assert code == 0
    a, b = final_weights(straight), final_weights(parted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    results = json.loads((straight / "results.json").read_text())
    assert results["distill"]["teacher_metrics"]["loss"] > 0 and results["distill"]["teacher"] == str(env["gpt"])
    assert "loss" in json.loads(out)["metrics"]


def test_lm_student_with_a_projection_saves_it_beside_the_model(env, tmp_path, capsys):
    out = tmp_path / "proj"
    args = lm_args(env, out, "--student", "gpt-tiny", "--set", "model.n_layer=1", "--set", "model.n_head=1",
                   "--set", "model.n_embd=16", "--hidden-weight", 1)  # fmt: skip
    assert run(args, capsys)[0] == 0
    step = checkpoint.resolve(out)
    assert (step / "aux.safetensors").is_file()
    assert not any(k.startswith("project") for k in checkpoint.load(out).model)
    loaded = runs.load(out)  # the student alone, as eval and sample read it
    assert loaded.model.config.n_embd == 16
    code, text, _ = run(["eval", out], capsys)
    assert code == 0 and "loss" in text


def test_task_distillation_resumes_exactly_and_its_run_predicts_and_exports(env, tmp_path, capsys):
    straight, parted = tmp_path / "straight", tmp_path / "parted"
    student = ["--student-from-teacher", "0,2", "--hidden-weight", 1, "--attention-weight", 0.5]
    assert run(task_args(env, straight, *student), capsys)[0] == 0
    assert run(task_args(env, parted, *student, "--stop-at", 3), capsys)[0] == 0
    assert run(["distill", "--out", parted, "--resume"], capsys)[0] == 0
    a, b = final_weights(straight), final_weights(parted)
    assert all(torch.equal(a[k], b[k]) for k in a)
    results = json.loads((straight / "results.json").read_text())
    table = {r["model"]: r for r in results["distill"]["table"]}
    assert table["student"]["params"] < table["teacher"]["params"] and table["student"]["examples_per_s"] > 0
    assert (straight / "distill.md").is_file() and (straight / "distill.png").is_file()
    assert runs.load(straight).model.backbone.config.n_layer == 2
    code, out, _ = run(["predict", straight, "--input", env["val"]], capsys)
    assert code == 0 and out.strip()
    assert run(["export", straight, "--to", tmp_path / "hf"], capsys)[0] == 0


def test_the_teacher_cache_holds_the_teachers_own_outputs(env):
    teacher = distill.load_teacher(str(env["ft"]))
    student = distill.task_student(distill.DistillSettings(teacher=str(env["ft"]), student_from_teacher="0"), teacher)
    model = TaskModel(*student)
    d = distill.Distiller(distill.DistillSettings(teacher="t"), teacher.model, model, None, "task")
    tok = teacher.tokenizer
    rows = [{"input_ids": tok.encode(t)[:20], "labels": i % 2, "example": i} for i, t in enumerate(["a b", "c d e f",
            "g"] * 3)]  # fmt: skip
    d.fill_cache(rows, 4, tok.pad_id, torch.device("cpu"))
    batch = L.collate([rows[5], rows[1]], tok.pad_id)
    with torch.no_grad():
        direct = teacher.model(batch)[0]["logits"]
    torch.testing.assert_close(d._cached(batch)["logits"], direct, rtol=1e-5, atol=1e-6)


def test_bad_input_is_one_sentence(env, tmp_path, capsys):
    cases = [
        (lm_args(env, tmp_path / "a"), "exactly one of --student"),
        (lm_args(env, tmp_path / "b", "--student", "gpt-tiny", "--student-from-teacher", "0"), "exactly one"),
        (lm_args(env, tmp_path / "c", "--student-from-teacher", "0,5"), "block 5 is out of range"),
        (lm_args(env, tmp_path / "d", "--student-from-teacher", "0", "--hidden-weight", 1, "--layer-map", "3:1"),
         "the teacher has layers 0"),
        (lm_args(env, tmp_path / "e", "--student", "gpt-tiny", "--set", "model.n_head=1", "--set", "model.n_embd=16",
                 "--hidden-weight", 1, "--no-projection"), "needs the learned projection"),
        (lm_args(env, tmp_path / "f", "--student", "bert-tiny"), "needs the same family"),
        (lm_args(env, tmp_path / "g", "--student", env["other_gpt"]), "share the teacher's tokenizer"),
        (lm_args(env, tmp_path / "h", "--student", "gpt-tiny", "--kd-weight", 0, "--task-weight", 0),
         "every distillation weight is 0"),
        (task_args(env, tmp_path / "i", "--student-from-teacher", "0", "--data", env["corpus"]),
         "--data is the corpus"),
        (lm_args(env, tmp_path / "j", "--student", "gpt-tiny", "--epochs", 2), "--epochs applies to distilling"),
        (["distill", "--out", tmp_path / "k", "--student", "gpt-tiny"], "distill needs --teacher"),
    ]  # fmt: skip
    for args, message in cases:
        code, _, err = run(args, capsys)
        assert code == 2, (args, err)
        last = err.strip().splitlines()[-1]  # after the lines that say what the job loaded
        assert message in last and last.startswith("error: ") and err.count("error:") == 1, err
        assert "Traceback" not in err and not (tmp_path / "a" / "config.json").exists()


@pytest.fixture(scope="module")
def tasks_env(env, tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    return {**make_data(root), "gpt_dir": make_gpt_dir(root, [t for t, _ in demo_rows()[0]] * 2), "root": root}


TASKS = {
    "similarity": lambda d: ["--train", d["pairs"], "--val", d["pairs"]],
    "tokens": lambda d: ["--train", d["tags"], "--val", d["tags"]],
    "qa": lambda d: ["--train", d["squad"], "--max-length", 48],
    "instruct": lambda d: ["--train", d["instruct"], "--val", d["instruct"]],
}


@pytest.mark.parametrize("task", list(TASKS))
def test_each_task_distils_from_its_fine_tuned_teacher(env, tasks_env, task, capsys):
    root = tasks_env["root"]
    base = tasks_env["gpt_dir"] if task == "instruct" else env["bert"]
    files = TASKS[task](tasks_env)
    teacher = root / f"{task}-teacher"
    assert run(["finetune", "--from", base, "--out", teacher, "--task", task, *files, "--steps", 3,
                "--batch-size", 8], capsys)[0] == 0  # fmt: skip
    out = root / f"{task}-student"
    code, text, err = run(["distill", "--teacher", teacher, "--student-from-teacher", "0", "--out", out, *files,
                           "--steps", 3, "--batch-size", 8], capsys)  # fmt: skip
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == task and results["distill"]["teacher_metrics"]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(v == v and v >= 0 for v in losses)


def test_a_preset_student_takes_the_teachers_tokenizer_and_vocabulary(env, tmp_path, capsys):
    out = tmp_path / "preset"
    code, _, err = run(task_args(env, out, "--student", "bert-tiny", "--hidden-weight", 1), capsys)
    assert code == 0, err
    student, teacher = runs.load(out), runs.load(env["ft"])
    assert student.model.backbone.config.vocab_size == teacher.model.backbone.config.vocab_size
    assert student.model.backbone.config.n_embd == 128 and student.tokenizer.to_json() == teacher.tokenizer.to_json()
    assert (checkpoint.resolve(out) / "aux.safetensors").is_file()  # 128 -> 32: the learned projection


@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_vocabulary_soft_labels_equal_the_divergence_of_the_full_logits(family):
    """The chunked term from the captured pre-head states equals D over the logits the models output (a masked
    LM's separate decoder bias folded in as one more column)."""
    torch.manual_seed(0)
    if family == "bert":
        cfg = BERTConfig(
            vocab_size=40, max_position_embeddings=16, n_layer=2, n_head=2, n_embd=32, intermediate_size=40
        )
        teacher = BERTForMaskedLM(cfg).eval()
        torch.nn.init.normal_(teacher.cls.predictions.bias)
    else:
        teacher = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    student = student_from_teacher(teacher, [1]).requires_grad_(True)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 40, (2, 7))
    labels = torch.where(torch.rand(2, 7) < 0.5, ids, torch.full_like(ids, -100))
    labels[0, 0] = ids[0, 0]
    if family == "bert":
        batch, loss = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}, MaskedLM.loss
        logits = lambda m: m(ids, torch.ones_like(ids))[0]  # noqa: E731
    else:
        batch, loss, logits = (ids, labels), CausalLM.loss, lambda m: m(ids)[0]  # noqa: E731
    settings = DistillSettings(teacher="t", kd_weight=1.0, task_weight=0.0, temperature=1.5)
    got = distill.Distiller(settings, teacher, student, loss, "lm")(student, batch)
    with torch.no_grad():
        want = kd_divergence(logits(student), logits(teacher), 1.5, "forward", mask=labels != -100)
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
