"""Labeled-data readers, label maps, tokenisation with dynamic padding and the resumable batcher: small hand-made
files in tmp_path, then a few real rows of ../shared/data (SST-2, STS-B with QUOTE_NONE)."""

import json

import pytest
import torch

from tinygraft.data.labeled import (
    Example,
    LabeledBatcher,
    LabelMap,
    check_label_count,
    collate,
    count_tokens,
    encode_classification,
    encode_pairs,
    encode_prompt_completion,
    encode_prompt_completions,
    eval_batches,
    read_labeled,
    read_rows,
)
from tinygraft.data.tokenizer import TextTokenizer
from tinygraft.errors import TinygraftError

CORPUS = [
    "the film is a charming and often affecting journey",
    "unflinchingly bleak and desperate",
    "a man is playing a large flute while a woman sings",
    "Which NFL team represented the AFC at Super Bowl 50?",
] * 4


@pytest.fixture(scope="module")
def wordpiece():
    return TextTokenizer.train(CORPUS, "wordpiece", 150)


@pytest.fixture(scope="module")
def bpe():
    return TextTokenizer.train(CORPUS, "bpe", 320)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------------ reading
def test_tsv_csv_jsonl_named_columns(tmp_path):
    tsv = write(tmp_path / "a.tsv", "sentence\tlabel\nnice film\tpos\n\nbad film\tneg\n")
    ex = read_labeled(tsv, text_col="sentence")
    assert [(e.text, e.label, e.line) for e in ex] == [("nice film", "pos", 2), ("bad film", "neg", 4)]
    csv_ = write(tmp_path / "a.csv", 'premise,hypothesis,label\n"a, b",c,1\nd,e,0\n')
    ex = read_labeled(csv_, text_col="premise", text_pair_col="hypothesis")
    assert (ex[0].text, ex[0].text_pair, ex[0].label) == ("a, b", "c", "1")
    jsonl = write(tmp_path / "a.jsonl", '{"text": "x y", "label": ["a", "b"]}\n{"text": "z", "label": []}\n')
    ex = read_labeled(jsonl, problem="multi_label")
    assert ex[0].label == ["a", "b"] and ex[1].label == []
    reg = write(tmp_path / "r.jsonl", '{"text": "x", "score": 4.5}\n')
    assert read_labeled(reg, label_col="score", problem="regression")[0].label == 4.5
    assert read_labeled(tsv, text_col="sentence", label_col=None)[0].label is None  # prediction input


def test_bad_files_are_one_sentence_errors(tmp_path):
    tsv = write(tmp_path / "a.tsv", "sentence\tlabel\nnice\tpos\n")
    with pytest.raises(TinygraftError, match=r"has no column 'text' \(columns found: sentence, label\)"):
        read_labeled(tsv)
    with pytest.raises(TinygraftError, match="is empty"):
        read_labeled(write(tmp_path / "e.tsv", ""))
    with pytest.raises(TinygraftError, match="holds no rows"):
        read_labeled(write(tmp_path / "h.tsv", "text\tlabel\n"))
    with pytest.raises(TinygraftError, match="holds no rows"):
        read_labeled(write(tmp_path / "e.jsonl", "\n"))
    with pytest.raises(TinygraftError, match="does not exist"):
        read_labeled(tmp_path / "missing.tsv")
    with pytest.raises(TinygraftError, match="line 2 is not valid JSON"):
        read_labeled(write(tmp_path / "b.jsonl", '{"text": "a", "label": "x"}\n{"text": \n'))
    with pytest.raises(TinygraftError, match="line 2 has no label"):
        read_labeled(write(tmp_path / "n.tsv", "text\tlabel\nabc\t\n"))
    with pytest.raises(TinygraftError, match="not a number"):
        read_labeled(write(tmp_path / "r.tsv", "text\tlabel\nabc\thigh\n"), problem="regression")


def test_quote_none_for_stray_quotes(tmp_path):
    # STS-B style: a field opening with a quote that never closes swallows the rest of the file under QUOTE_MINIMAL
    path = write(tmp_path / "s.tsv", 's1\ts2\tscore\n"A man plays\tA man is playing\t4.2\nA dog\tA cat\t0.5\n')
    with pytest.raises(TinygraftError, match="line 2 has 1 fields but the header has 3.*quote"):
        read_labeled(path, "s1", "score", "s2", problem="regression")
    ex = read_labeled(path, "s1", "score", "s2", problem="regression", quote_none=True)
    assert [(e.text, e.label, e.line) for e in ex] == [('"A man plays', 4.2, 2), ("A dog", 0.5, 3)]


# ---------------------------------------------------------------------------------------------------- label map
def test_label_map_build_save_load_and_unknown_label(tmp_path):
    lm = LabelMap.build(["10", "2", "1", "2"])
    assert lm.names == ["1", "2", "10"]  # numeric names sort as numbers
    assert LabelMap.build([["b", "a"], ["c"]]).names == ["a", "b", "c"]
    path = lm.save(tmp_path / "labels.json")
    assert json.loads(path.read_text())["id2label"] == {"0": "1", "1": "2", "2": "10"}
    assert LabelMap.load(path).names == lm.names
    with pytest.raises(
        TinygraftError, match=r"unknown label '7' at dev.tsv line 9 \(the training labels are: 1, 2, 10\)"
    ):
        lm.id("7", "dev.tsv line 9")


def test_unknown_label_at_eval_names_the_line(tmp_path, wordpiece):
    train = read_labeled(write(tmp_path / "t.tsv", "text\tlabel\na\tpos\nb\tneg\n"))
    dev = read_labeled(write(tmp_path / "d.tsv", "text\tlabel\nc\tpos\nd\tneutral\n"))
    lm = LabelMap.build(e.label for e in train)
    with pytest.raises(TinygraftError, match="unknown label 'neutral' at d.tsv line 3"):
        encode_classification(dev, wordpiece, 16, lm, source="d.tsv")


def test_label_count_mismatch_with_loaded_head():
    check_label_count(LabelMap(["a", "b"]), 2)
    with pytest.raises(TinygraftError, match="the data has 3 labels .* but the loaded head has 2 outputs"):
        check_label_count(LabelMap(["a", "b", "c"]), 2)


# ------------------------------------------------------------------------------------------- encode and pad
def test_dynamic_padding_to_batch_max(wordpiece):
    examples = read_rows_examples(["the film", "a man is playing a large flute while a woman sings", "bleak"])
    lm = LabelMap(["x"])
    feats = encode_classification(examples, wordpiece, max_length=9, label_map=lm)
    assert [f["input_ids"][0] for f in feats] == [wordpiece.cls_id] * 3
    assert max(len(f["input_ids"]) for f in feats) == 9  # truncated to max_length, [SEP] kept
    b = collate(feats[:1] + feats[2:], wordpiece.pad_id)  # short batch: padded to its own longest, not to 9
    T = max(len(feats[0]["input_ids"]), len(feats[2]["input_ids"]))
    assert b["input_ids"].shape == b["attention_mask"].shape == b["token_type_ids"].shape == (2, T)
    for i, f in enumerate([feats[0], feats[2]]):
        n = len(f["input_ids"])
        assert b["input_ids"][i, :n].tolist() == f["input_ids"] and (b["input_ids"][i, n:] == wordpiece.pad_id).all()
        assert b["attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
    assert b["labels"].dtype == torch.long and count_tokens(b) == sum(len(f["input_ids"]) for f in [feats[0], feats[2]])


def read_rows_examples(texts, label="x"):
    return [Example(t, None, label, i + 2) for i, t in enumerate(texts)]


def test_pairs_for_cross_and_bi_encoders(wordpiece):
    ex = [Example("a man is playing", "a woman sings", 3.8, 2)]
    cross = encode_classification(ex, wordpiece, 32, problem="regression")[0]
    assert cross["input_ids"].count(wordpiece.sep_id) == 2 and cross["token_type_ids"][-1] == 1
    assert cross["labels"] == 3.8
    bi = collate(encode_pairs(ex * 2, wordpiece, 32), wordpiece.pad_id)
    assert {"input_ids_a", "attention_mask_a", "input_ids_b", "attention_mask_b"} <= set(bi)
    assert bi["labels"].dtype == torch.float32 and bi["labels"].tolist() == pytest.approx([3.8, 3.8])
    with pytest.raises(TinygraftError, match="text-pair-col"):
        encode_pairs([Example("a", None, 1.0, 2)], wordpiece, 8)


def test_multi_label_multi_hot(wordpiece):
    lm = LabelMap(["a", "b", "c"])
    feats = encode_classification([Example("x", None, ["c", "a"], 2)], wordpiece, 8, lm, "multi_label")
    b = collate(feats, wordpiece.pad_id)
    assert b["labels"].tolist() == [[1.0, 0.0, 1.0]] and b["labels"].dtype == torch.float32


def test_prompt_completion_masks_the_prompt(bpe):
    f = encode_prompt_completion(bpe, "Which NFL team", " represented the AFC", max_length=64)
    p, t = bpe.encode("Which NFL team"), bpe.encode(" represented the AFC")
    assert f["input_ids"] == p + t + [bpe.eos_id]
    assert f["labels"] == [-100] * len(p) + t + [bpe.eos_id]
    prompt, target = "Which NFL team represented the AFC at Super Bowl", " a man is playing"
    short = encode_prompt_completion(bpe, prompt, target, max_length=6)
    # too long: the completion keeps half the budget (its start; a cut completion ends without <eos>), the prompt
    # keeps its end
    assert short["input_ids"] == bpe.encode(prompt)[-3:] + bpe.encode(target)[:3]
    assert short["labels"] == [-100] * 3 + bpe.encode(target)[:3]
    rows = [Example("Which NFL team", " represented the AFC", None, 2)]
    assert encode_prompt_completions(rows, bpe, 64) == [f]
    b = collate([f, short], bpe.pad_id)
    assert b["labels"].shape == b["input_ids"].shape and (b["labels"][1, 6:] == -100).all()


# ----------------------------------------------------------------------------------------------------- batching
def test_batcher_epochs_and_exact_resume():
    feats = [{"input_ids": list(range(1, 2 + i % 5)), "labels": i} for i in range(7)]
    a = LabeledBatcher(feats, batch_size=3, pad_id=0, seed=5)
    epoch0 = [a.next()["labels"].tolist() for _ in range(a.steps_per_epoch)]
    assert sorted(sum(epoch0, [])) == list(range(7)) and [len(x) for x in epoch0] == [3, 3, 1]
    for _ in range(2):
        a.next()
    state = json.loads(json.dumps(a.state_dict()))  # survives the JSON trip a checkpoint makes
    expected = [a.next()["labels"].tolist() for _ in range(4)]
    b = LabeledBatcher(feats, batch_size=3, pad_id=0, seed=5)
    b.load_state_dict(state)
    assert [b.next()["labels"].tolist() for _ in range(4)] == expected
    assert a.epoch == 2 and epoch0 != [x["labels"].tolist() for x in eval_batches(feats, 3, 0)]  # it shuffles
    with pytest.raises(TinygraftError, match="has 6 examples but the checkpoint was taken with 7"):
        LabeledBatcher(feats[:6], 3, 0).load_state_dict(state)


# -------------------------------------------------------------------------------------------------- real data
def test_real_sst2_rows(shared_data, wordpiece):
    dev = read_labeled(shared_data / "sst2" / "dev.tsv", text_col="sentence")
    assert len(dev) == 872
    lm = LabelMap.build(e.label for e in dev)
    assert lm.names == ["0", "1"]
    assert sum(e.label == "1" for e in dev) == 444  # the README's counts
    feats = encode_classification(dev[:5], wordpiece, 64, lm)
    b = collate(feats, wordpiece.pad_id)
    assert b["input_ids"].shape[0] == 5 and b["labels"].tolist() == [int(e.label) for e in dev[:5]]


def test_real_stsb_needs_quote_none(shared_data):
    path = shared_data / "stsb" / "dev.tsv"
    dev = read_labeled(path, "sentence1", "score", "sentence2", problem="regression", quote_none=True)
    assert len(dev) == 1500 and all(0.0 <= e.label <= 5.0 for e in dev)
    assert dev[0].text == "A man with a hard hat is dancing." and dev[0].label == 5.0
    columns, _ = read_rows(path, quote_none=True)
    assert columns[-3:] == ["sentence1", "sentence2", "score"]
    # without QUOTE_NONE a stray quote swallows tabs and lines; the field count catches it and says what to do
    with pytest.raises(TinygraftError, match="line 766 has 9 fields but the header has 10 .*quote_none"):
        read_labeled(path, "sentence1", "score", "sentence2", problem="regression")
