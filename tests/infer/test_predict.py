"""One reader per task, shared by training and prediction: every input form `finetune` accepts for a task,
`predict` accepts with the same meaning (the same examples, so the same predictions); plain text and stdin keep
working as one example per line; `--input-format` forces a reading; the reading chosen is named on stderr.

The case that started it: a CoNLL file named `valid.txt` (CoNLL-2003's own names) was read by `predict` as one
sentence per line, so "CRICKET O" tagged the tag column as a word."""

import io
import json

import pytest

from tests.train.finetune_fixtures import make_bert_dir, make_data, make_gpt_dir, write_tsv
from tinygraft.cli.main import main


def run(args, capsys, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    data = make_data(root)
    texts = [ln.split("\t")[0] for ln in data["train"].read_text().splitlines()[1:]]
    bert, gpt = make_bert_dir(root, texts * 3), make_gpt_dir(root, texts * 3)
    trained = {}
    plan = {
        "classify": (bert, ["--train", data["train"], "--val", data["val"]]),
        "tokens": (bert, ["--task", "tokens", "--train", data["tags"], "--val", data["tags"]]),
        "qa": (bert, ["--task", "qa", "--train", data["squad"], "--max-length", 48]),
        "similarity": (bert, ["--task", "similarity", "--train", data["pairs"], "--val", data["pairs"]]),
        "instruct": (gpt, ["--task", "instruct", "--train", data["instruct"], "--val", data["instruct"]]),
    }
    for task, (model, extra) in plan.items():
        out = root / f"run-{task}"
        args = ["finetune", "--from", model, "--out", out, "--steps", 1, "--batch-size", 8, *extra]
        assert main([str(a) for a in args]) == 0
        trained[task] = out
    return {"root": root, "runs": trained, **data}


def test_classify_reads_every_table_form_and_plain_lines_alike(env, tmp_path, capsys, monkeypatch):
    lines = env["val"].read_text().splitlines()[1:]
    rows = [line.split("\t") for line in lines]
    csv_file = tmp_path / "val.csv"
    csv_file.write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in rows))
    jsonl = tmp_path / "val.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    array = tmp_path / "val.json"
    array.write_text(json.dumps([{"text": t} for t, _ in rows]))
    as_txt = tmp_path / "val.txt"
    as_txt.write_text(env["val"].read_text())  # a TSV with the run's header, named .txt
    plain = tmp_path / "plain.txt"
    plain.write_text("".join(t + "\n" for t, _ in rows))
    run_dir = env["runs"]["classify"]
    want = None
    for source in (env["val"], csv_file, jsonl, array, as_txt):
        code, got, err = run(["predict", run_dir, "--input", source], capsys)
        assert code == 0 and "as a table with the run's columns" in err, (source, err)
        assert [r["text"] for r in got] == [t for t, _ in rows]
        want = want or got
        assert got == want, source
    code, got, err = run(["predict", run_dir, "--input", plain], capsys)
    assert code == 0 and "as one example per line" in err and got == want
    code, got, err = run(
        ["predict", run_dir], capsys, stdin="".join(t + "\n" for t, _ in rows), monkeypatch=monkeypatch
    )
    assert code == 0 and "reading stdin as one example per line" in err and got == want
    code, got, err = run(["predict", run_dir, "--input", env["val"], "--input-format", "text"], capsys)
    assert code == 0 and got[0]["text"] == "text\tlabel"  # forced: the header is a line like any other


def test_tokens_reads_conll_whatever_its_name_and_jsonl_and_plain_words(env, tmp_path, capsys):
    conll = env["tags"].read_text()
    valid = tmp_path / "valid.txt"  # CoNLL-2003's own file name
    valid.write_text("-DOCSTART- -X- -X- O\n\n" + conll)
    sentences = [[ln.split()[0] for ln in block.splitlines()] for block in conll.strip().split("\n\n")]
    jsonl = tmp_path / "sents.jsonl"
    jsonl.write_text("".join(json.dumps({"tokens": ws}) + "\n" for ws in sentences))
    plain = tmp_path / "plain.txt"
    plain.write_text("".join(" ".join(ws) + "\n" for ws in sentences))
    run_dir = env["runs"]["tokens"]
    code, want, err = run(["predict", run_dir, "--input", env["tags"]], capsys)
    assert code == 0 and "CoNLL columns" in err, err
    assert [r["words"] for r in want] == sentences  # the words, never the tags
    for source, reading in ((valid, "CoNLL columns"), (jsonl, "JSON Lines token lists"), (plain, "one example")):
        code, got, err = run(["predict", run_dir, "--input", source], capsys)
        assert code == 0 and reading in err and got == want, (source, err)
    code, got, err = run(["predict", run_dir, "--input", valid, "--input-format", "text"], capsys)
    assert code == 0 and got[0]["words"] == ["-DOCSTART-", "-X-", "-X-", "O"]  # forced: lines of words
    code, _, err = run(["predict", run_dir, "--input", valid, "--input-format", "table"], capsys)
    assert code == 2 and "--input-format table is not a reading of the tokens task" in err


def test_qa_reads_squad_a_table_and_question_context_lines(env, tmp_path, capsys):
    articles = json.loads(env["squad"].read_text())["data"]
    pairs = [(qa["question"], p["context"]) for a in articles for p in a["paragraphs"] for qa in p["qas"]]
    table = write_tsv(tmp_path / "qa.tsv", ["question", "context"], pairs)
    lines = tmp_path / "qa.txt"
    lines.write_text("".join(f"{q}\t{c}\n" for q, c in pairs))
    run_dir = env["runs"]["qa"]
    code, want, err = run(["predict", run_dir, "--input", env["squad"]], capsys)
    assert code == 0 and "SQuAD JSON" in err and [r["question"] for r in want] == [q for q, _ in pairs]
    for source, reading in ((table, "a table"), (lines, "one example per line")):
        code, got, err = run(["predict", run_dir, "--input", source], capsys)
        assert code == 0 and reading in err and got == want, (source, err)


def test_similarity_and_instruct_read_their_tables_and_plain_lines(env, tmp_path, capsys):
    rows = [ln.split("\t") for ln in env["pairs"].read_text().splitlines()[1:]]
    lines = tmp_path / "pairs.txt"
    lines.write_text("".join(f"{a}\t{b}\n" for a, b, _ in rows))
    code, want, err = run(["predict", env["runs"]["similarity"], "--input", env["pairs"]], capsys)
    assert code == 0 and "a table" in err and len(want) == len(rows)
    code, got, err = run(["predict", env["runs"]["similarity"], "--input", lines], capsys)
    assert code == 0 and "one example per line" in err and got == want
    prompts = [json.loads(line)["prompt"] for line in env["instruct"].read_text().splitlines()][:3]
    table = tmp_path / "prompts.jsonl"
    table.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    args = ["predict", env["runs"]["instruct"], "--max-new-tokens", 2, "--input"]
    code, want, err = run([*args, table], capsys)
    assert code == 0 and "a table" in err and [r["prompt"] for r in want] == prompts
    one_line = [p.replace("\n", " ") for p in prompts]  # a prompt per line cannot hold a newline
    plain = tmp_path / "prompts.txt"
    plain.write_text("".join(p + "\n" for p in one_line))
    code, got, err = run([*args, plain], capsys)
    assert code == 0 and "one example per line" in err and [r["prompt"] for r in got] == one_line
