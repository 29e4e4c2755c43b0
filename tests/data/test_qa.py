"""QA windows, answer positions and post-processing: hand-made contexts, then real SQuAD questions."""

import json

import numpy as np
import pytest
import torch

from tinygraft.data.labeled import collate, eval_batches
from tinygraft.data.qa import (
    QAExample,
    best_span,
    make_qa_features,
    postprocess_qa,
    read_qa_table,
    read_squad,
    split_articles,
)
from tinygraft.data.tokenizer import TextTokenizer
from tinygraft.errors import TinygraftError
from tinygraft.tasks import get_task
from tinygraft.tasks.metrics import squad_metrics

CONTEXT = (
    "Super Bowl 50 was an American football game to determine the champion of the National Football League "
    "for the 2015 season. The American Football Conference champion Denver Broncos defeated the National "
    "Football Conference champion Carolina Panthers 24 to 10 to earn their third Super Bowl title. The game "
    "was played on February 7, 2016, at Levi's Stadium in the San Francisco Bay Area at Santa Clara, California."
)


@pytest.fixture(scope="module", params=["wordpiece", "bpe"])
def tok(request):
    return TextTokenizer.train(
        [CONTEXT, "Which NFL team won? Where was it played?"] * 3,
        request.param,
        200 if request.param == "wordpiece" else 300,
    )


def example(answer, question="Which NFL team represented the AFC at Super Bowl 50?"):
    return QAExample("q1", "Super_Bowl_50", CONTEXT, question, [answer], [CONTEXT.index(answer)])


def gold_logits(f, T):
    """Logits that put all the mass on the window's target positions."""
    s, e = np.full(T, -10.0), np.full(T, -10.0)
    s[f["start_positions"]], e[f["end_positions"]] = 10.0, 10.0
    return s, e


@pytest.mark.parametrize("answer", ["Denver Broncos", "Santa Clara, California", "Super Bowl 50"])
def test_windows_overlap_and_point_at_the_answer(tok, answer):
    ex = example(answer)
    feats = make_qa_features([ex], tok, max_length=40, stride=10, max_query_length=12)
    assert len(feats) > 2 and all(len(f["input_ids"]) <= 40 for f in feats)
    ctx_spans = [[o for o in f["offsets"] if o is not None] for f in feats]
    for a, b in zip(ctx_spans, ctx_spans[1:]):
        assert a[-10:] == b[:10]  # consecutive windows share exactly `stride` context tokens
    holding = []
    for f in feats:
        s, e = f["start_positions"], f["end_positions"]
        if s == 0:
            assert e == 0  # no whole answer in this window: both ends on [CLS]
            continue
        holding.append(f)
        assert f["offsets"][s] is not None and s <= e
        span = CONTEXT[f["offsets"][s][0] : f["offsets"][e][1]].strip()
        assert span == answer
    assert holding, "some window must hold the answer"
    # post-processing the target positions gives the answer text back, whichever window holds it
    logits = [gold_logits(f, len(f["input_ids"])) for f in feats]
    assert postprocess_qa([ex], feats, [x[0] for x in logits], [x[1] for x in logits]) == [answer]


def test_best_span_rules():
    offsets = [None, None, (0, 3), (4, 8), (9, 12), None]
    s = np.array([9.0, 0, 1, 5, 0, 9])  # the best starts (0 and 5) are outside the context
    e = np.array([9.0, 0, 4, 0, 2, 9])
    assert best_span(s, e, offsets) == (5.0 + 2.0, 3, 4)  # start 3 (5) with end 4 (2): 3 -> 2 would be end < start
    assert best_span(s, e, offsets, max_answer_length=1) == (1.0 + 4.0, 2, 2)
    assert best_span(s, e, [None] * 6) is None


def test_unanswerable_window_and_padding(tok):
    ex = example("Denver Broncos")
    feats = make_qa_features([ex], tok, max_length=40, stride=10, max_query_length=12)
    b = collate(feats, tok.pad_id)
    assert b["start_positions"].shape == (len(feats),) and isinstance(b["offsets"], list)
    assert b["example_index"] == [0] * len(feats)
    with pytest.raises(TinygraftError, match="raise max_length or lower stride"):
        make_qa_features([ex], tok, max_length=20, stride=10, max_query_length=12)


def test_read_qa_table(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "Who won?", "context": CONTEXT, "answer": "Denver Broncos"}) + "\n")
    ex = read_qa_table(path)
    assert ex[0].answer_starts == [CONTEXT.index("Denver Broncos")]
    path.write_text(json.dumps({"question": "Who won?", "context": CONTEXT, "answer": "the Jets"}) + "\n")
    with pytest.raises(TinygraftError, match="line 1: the answer 'the Jets' is not in its context"):
        read_qa_table(path)


def squad(tmp_path, answers, **qa):
    path = tmp_path / "squad.json"
    question = {"id": "q1", "question": "Who won?", "answers": answers, **qa}
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": CONTEXT, "qas": [question]}]}]}))
    return path


def test_squad_answers_are_checked_against_their_context(tmp_path):
    """An answer not at its answer_start is taken at its first occurrence and counted (SQuAD's own tooling does
    the same); one not in the context, or an offset that is no number, is refused; the table reader alike."""
    at = CONTEXT.index("Denver Broncos")
    ok = read_squad(squad(tmp_path, [{"text": "Denver Broncos", "answer_start": at}]))
    assert ok[0].answer_starts == [at] and ok.notes == []
    moved = read_squad(squad(tmp_path, [{"text": "Denver Broncos", "answer_start": at + 3}]))
    assert moved[0].answer_starts == [at] and "1 answers of" in moved.notes[0] and "first occurrence" in moved.notes[0]
    past = read_squad(squad(tmp_path, [{"text": "Denver Broncos", "answer_start": len(CONTEXT) + 40}]))
    assert past[0].answer_starts == [at] and past.notes
    with pytest.raises(TinygraftError, match="question 'q1': the answer 'bowl 50 was an american' is not in"):
        read_squad(squad(tmp_path, [{"text": "bowl 50 was an american", "answer_start": 0}]))
    with pytest.raises(TinygraftError, match="answer_start 'abc' is not a character offset"):
        read_squad(squad(tmp_path, [{"text": "Denver Broncos", "answer_start": "abc"}]))
    (tmp_path / "bad.json").write_text(json.dumps({"data": [{"title": "t", "paras": []}]}))
    with pytest.raises(TinygraftError, match="article 't' has no 'paragraphs'; not a SQuAD v1.1 file"):
        read_squad(tmp_path / "bad.json")
    (tmp_path / "noid.json").write_text(json.dumps({"data": [{"title": "t", "paragraphs": [
        {"context": CONTEXT, "qas": [{"question": "?", "answers": []}]}]}]}))  # fmt: skip
    with pytest.raises(TinygraftError, match="has no 'id'"):
        read_squad(tmp_path / "noid.json")
    table = tmp_path / "qa.jsonl"
    table.write_text(json.dumps({"question": "Who?", "context": CONTEXT, "answer": "Denver Broncos", "at": at + 1}))
    read = read_qa_table(table, answer_start_col="at")
    assert read[0].answer_starts == [at] and "were not at their at" in read.notes[0]


def test_split_articles_is_deterministic_and_disjoint():
    titles = [f"article_{i}" for i in range(48)]
    val = split_articles(titles, 0.2)
    assert len(val) == 10 and val == split_articles(list(reversed(titles)), 0.2)


def test_real_squad_split_and_gold_round_trip(shared_data):
    path = shared_data / "squad" / "dev-v1.1.json"
    train, val = read_squad(path, "train"), read_squad(path, "val")
    assert len(train) + len(val) == 10570 and len(val) > 1000
    assert not {e.title for e in train} & {e.title for e in val}
    tok = TextTokenizer.train([e.context for e in val[:200]], "wordpiece", 2000)
    some = val[::97][:12]
    feats = make_qa_features(some, tok, max_length=96, stride=32)
    assert len(feats) > len(some)  # long contexts were split
    logits = [gold_logits(f, len(f["input_ids"])) for f in feats]
    answers = postprocess_qa(some, feats, [x[0] for x in logits], [x[1] for x in logits])
    # the gold positions map back to the first gold answer (up to SQuAD normalisation: lower-casing tokenizer)
    assert squad_metrics(answers, [e.answers for e in some])["exact_match"] == 1.0


def test_task_scorer_qa_from_padded_batches(tok):
    exs = [example("Denver Broncos"), example("Santa Clara, California", "Where was it played?")]
    feats = make_qa_features(exs, tok, max_length=40, stride=10, max_query_length=12)
    scorer = get_task("qa").scorer(None, None, exs, feats)
    done = 0
    for batch in eval_batches(feats, 3, tok.pad_id):
        B, T = batch["input_ids"].shape
        s, e = torch.full((B, T), -10.0), torch.full((B, T), -10.0)
        for i in range(B):
            s[i, batch["start_positions"][i]] = e[i, batch["end_positions"][i]] = 10.0
        pad = batch["attention_mask"] == 0
        s[pad] = e[pad] = 99.0  # padding columns must never be read as an answer
        s[:, :2] = e[:, :2] = 50.0  # nor [CLS] / question tokens
        scorer.add({"start_logits": s, "end_logits": e}, batch)
        done += B
    assert done == len(feats)
    assert scorer.result() == {"exact_match": 1.0, "f1": 1.0}
