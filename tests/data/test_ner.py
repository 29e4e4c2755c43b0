"""NER readers (CoNLL columns, JSONL lists) and tag alignment to sub-words, on hand-made sentences."""

import tempfile
from pathlib import Path

import pytest

from tinygraft.data.labeled import collate
from tinygraft.data.ner import (
    TaggedSentence,
    align_words,
    dump_conll,
    encode_tagged,
    read_tagged,
    tag_label_map,
    word_predictions,
)
from tinygraft.data.tokenizer import TextTokenizer
from tinygraft.errors import TinygraftError

CORPUS = ["EU rejects German call to boycott British lamb .", "Peter Blackburn went to Brussels ."] * 3

CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
"""


@pytest.fixture(scope="module", params=["wordpiece", "bpe"])
def tok(request):
    # tiny vocabularies, so most words split into several sub-words
    return TextTokenizer.train(CORPUS, request.param, 60 if request.param == "wordpiece" else 270)


def test_read_conll_and_jsonl(tmp_path):
    sents = read_tagged(_write(tmp_path / "a.conll", CONLL))
    assert [s.words for s in sents] == [["EU", "rejects", "German", "call"], ["Peter", "Blackburn"]]
    assert sents[1].tags == ["B-PER", "I-PER"] and [s.line for s in sents] == [3, 8]
    jsonl = _write(tmp_path / "a.jsonl", '{"tokens": ["EU", "rejects"], "ner": ["B-ORG", "O"]}\n')
    assert read_tagged(jsonl, tags_col="ner")[0].tags == ["B-ORG", "O"]
    assert read_tagged(jsonl, tags_col=None)[0].tags is None
    assert tag_label_map(sents).names == ["O", "B-MISC", "B-ORG", "B-PER", "I-PER"]


def test_bad_ner_files(tmp_path):
    with pytest.raises(TinygraftError, match="line 1: 2 tokens but 1 tags"):
        read_tagged(_write(tmp_path / "a.jsonl", '{"tokens": ["a", "b"], "tags": ["O"]}\n'))
    with pytest.raises(TinygraftError, match=r"has no column 'tags' \(columns found: tokens, labels\)"):
        read_tagged(_write(tmp_path / "b.jsonl", '{"tokens": ["a"], "labels": ["O"]}\n'))
    with pytest.raises(TinygraftError, match="holds no sentences"):
        read_tagged(_write(tmp_path / "c.conll", "\n\n"))
    with pytest.raises(TinygraftError, match="line 1 has no tag column"):
        read_tagged(_write(tmp_path / "d.conll", "lonely\n"))


def test_first_subword_gets_the_tag(tok):
    sents = read_tagged_str(CONLL)
    lm = tag_label_map(sents)
    feats = encode_tagged(sents, tok, max_length=64, label_map=lm)
    for sent, f in zip(sents, feats):
        ids, word_of = align_words(tok, sent.words)
        assert any(word_of.count(w) > 1 for w in set(word_of)), "the tiny vocabulary should split some word"
        # every word's sub-words decode back to the word, in order
        for w, word in enumerate(sent.words):
            pieces = [i for i, x in zip(ids, word_of) if x == w]
            assert tok.decode(pieces).replace(" ", "").lower() == word.lower()
        # labels: the tag id on each word's first sub-word, -100 elsewhere ([CLS], [SEP], continuations)
        tagged = [(w, lab) for w, lab in zip(f["word_ids"], f["labels"]) if lab != -100]
        assert [w for w, _ in tagged] == list(range(len(sent.words)))
        assert [lm.names[lab] for _, lab in tagged] == sent.tags
        if tok.cls_id is not None:
            assert f["labels"][0] == f["labels"][-1] == -100 and f["input_ids"][0] == tok.cls_id


def test_truncation_and_word_predictions(tok):
    sents = read_tagged_str(CONLL)
    lm = tag_label_map(sents)
    f = encode_tagged(sents[:1], tok, max_length=5, label_map=lm)[0]
    assert len(f["input_ids"]) == 5
    # predicting the gold label at every token returns the gold tags for the words that fit, "O" for the rest
    preds = [lab if lab != -100 else 0 for lab in f["labels"]]
    tags = word_predictions(preds, f["word_ids"], len(sents[0].words), lm)
    kept = max(f["word_ids"]) + 1
    assert tags[:kept] == sents[0].tags[:kept] and set(tags[kept:]) <= {"O"}
    b = collate([f], tok.pad_id)
    assert b["labels"].shape == b["input_ids"].shape and isinstance(b["word_ids"], list)


def test_unknown_tag_at_eval(tok):
    lm = tag_label_map(read_tagged_str(CONLL))
    dev = [TaggedSentence(["Paris"], ["B-LOC"], 12)]
    with pytest.raises(TinygraftError, match="unknown label 'B-LOC' at dev.conll line 12"):
        encode_tagged(dev, tok, 16, lm, source="dev.conll")


def test_dump_conll_round_trip(tmp_path):
    sents = read_tagged_str(CONLL)
    again = read_tagged(_write(tmp_path / "x.conll", dump_conll(sents)))
    assert [(s.words, s.tags) for s in again] == [(s.words, s.tags) for s in sents]


def read_tagged_str(text):
    with tempfile.TemporaryDirectory() as d:
        return read_tagged(_write(Path(d) / "x.conll", text))


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path
