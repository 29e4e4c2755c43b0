"""Tokenizers: train a byte-level BPE (GPT) or a WordPiece (BERT), or load one, behind one small wrapper.

`TextTokenizer` wraps a Hugging Face `tokenizers.Tokenizer` (the Rust library, not `transformers`), so a
tokenizer we train is saved as a standard `tokenizer.json` that the rest of the ecosystem reads, and a
pretrained `tokenizer.json` (or a BERT `vocab.txt`) loads here unchanged.

    byte-level BPE  (GPT-2 style): no normalizer; bytes -> 256 printable symbols, so every string encodes and
                    decode(encode(x)) == x exactly. One special token, `<|endoftext|>`: end of a document, and
                    also the padding id (GPT-2 has no pad token).
    WordPiece       (BERT style): lower-casing BertNormalizer (which also strips accents), split on whitespace and
                    punctuation, `##` marks a piece continuing a word. Specials [PAD] [UNK] [CLS] [SEP] [MASK]
                    take ids 0..4; a model input is `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]` with token types
                    0 for a (and its [CLS]/[SEP]) and 1 for b and its [SEP].
    loaded          whatever tokenizer.json holds. Its post-processor, when it is a BERT-style template, names the
                    first and last tokens and how a pair is joined: RoBERTa's (RobertaProcessing) is `<s> a </s>` and
                    `<s> a </s></s> b </s>`, all of token type 0, so `<s>`/`</s>` serve as cls/sep and `<mask>` masks.

`encode` never adds special tokens; `encode_for_model` adds the model's template. Padding and truncation
settings stored in a loaded tokenizer.json (MiniLM's pads everything to 128) are switched off: callers pad.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from tinygraft.errors import TinygraftError

EOT = "<|endoftext|>"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# Token strings we recognise as each special role in a loaded tokenizer, first match wins.
_ROLE_TOKENS = {
    "pad": ["[PAD]", "<pad>", "<|pad|>"],
    "eos": [EOT, "</s>", "<eos>", "<|eos|>"],
    "cls": ["[CLS]"],
    "sep": ["[SEP]"],
    "mask": ["[MASK]", "<mask>"],
    "unk": ["[UNK]", "<unk>", "<|unk|>"],
}
_KINDS = {"BPE": "bpe", "WordPiece": "wordpiece", "Unigram": "unigram", "WordLevel": "wordlevel"}


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the special ids and the model-input template the rest of tinygraft needs."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        # Callers pad and truncate explicitly; a tokenizer.json may carry its own settings (MiniLM: fixed 128).
        self._tok.no_padding()
        self._tok.no_truncation()
        self.kind = _KINDS.get(type(tokenizer.model).__name__, type(tokenizer.model).__name__.lower())
        ids = {role: self._first_id(names) for role, names in _ROLE_TOKENS.items()}
        self.eos_id: int | None = ids["eos"]
        self.cls_id: int | None = ids["cls"]
        self.sep_id: int | None = ids["sep"]
        self.mask_id: int | None = ids["mask"]
        self.unk_id: int | None = ids["unk"]
        # GPT-style vocabularies have no pad token: `<|endoftext|>` pads (attention masks hide it anyway).
        self.pad_id: int | None = ids["pad"] if ids["pad"] is not None else self.eos_id
        # A BERT-style template: `cls a sep`, and for a pair `pair_seps` separators before b, typed `pair_type`.
        self.pair_seps, self.pair_type = 1, 1
        template = _template_of(tokenizer)
        if template is not None:
            cls_tok, sep_tok, self.pair_seps, self.pair_type = template
            self.cls_id, self.sep_id = tokenizer.token_to_id(cls_tok), tokenizer.token_to_id(sep_tok)
        added = {i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special}
        self.special_ids: set[int] = added | {i for i in [*ids.values(), self.cls_id, self.sep_id] if i is not None}

    def _first_id(self, names: list[str]) -> int | None:
        for name in names:
            i = self._tok.token_to_id(name)
            if i is not None:
                return i
        return None

    # ----------------------------------------------------------------------------------------- construction
    @classmethod
    def train(cls, texts: Iterable[str], kind: str = "bpe", vocab_size: int = 4096) -> TextTokenizer:
        """Train a byte-level BPE (`kind="bpe"`) or a BERT WordPiece (`kind="wordpiece"`) on `texts`."""
        if kind not in ("bpe", "wordpiece"):
            raise TinygraftError(f"unknown tokenizer kind {kind!r}; use 'bpe' or 'wordpiece'")
        texts = list(texts)
        if not any(t.strip() for t in texts):
            raise TinygraftError("cannot train a tokenizer on an empty corpus; give it some text")
        if kind == "bpe":
            return cls(_train_bpe(texts, vocab_size))
        return cls(_train_wordpiece(texts, vocab_size))

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """Load a tokenizer.json file, a vocab.txt file, or a directory holding either (tokenizer.json first)."""
        path = Path(path)
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                path = path / "tokenizer.json"
            elif (path / "vocab.txt").is_file():
                path = path / "vocab.txt"
            else:
                raise TinygraftError(f"tokenizer directory '{path}' holds neither tokenizer.json nor vocab.txt")
        if not path.is_file():
            raise TinygraftError(f"tokenizer path '{path}' does not exist")
        if path.suffix == ".txt":
            return cls(_bert_from_vocab(path))
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # the Rust side raises a bare Exception with a serde message
            raise TinygraftError(f"tokenizer file '{path}' is not a valid tokenizer.json ({e})") from None

    @classmethod
    def from_json(cls, text: str) -> TextTokenizer:
        """Rebuild from `to_json()` output (e.g. the tokenizer.json stored in a checkpoint)."""
        return cls(Tokenizer.from_str(text))

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json: into `path` if it is (or will be) a directory, else to the file `path`."""
        path = Path(path)
        if path.suffix != ".json":
            path.mkdir(parents=True, exist_ok=True)
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    def to_json(self) -> str:
        return self._tok.to_str()

    # ----------------------------------------------------------------------------------------- encoding
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def separator_id(self) -> int | None:
        """The id that ends each document in a token stream: eos for GPT vocabularies, [SEP] for BERT ones."""
        return self.eos_id if self.eos_id is not None else self.sep_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def add_tokens(self, tokens: list[str]) -> int:
        """Add whole tokens (never split again); returns how many were new. See data.vocab.extend_vocab."""
        return self._tok.add_tokens(list(tokens))

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids without special tokens and each token's (start, end) character span in `text`.

        Byte-level BPE spans include the leading space a token carries ("Ġword" spans " word").
        """
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    @property
    def _bert_template(self) -> bool:
        return self.cls_id is not None and self.sep_id is not None

    def n_special(self, pair: bool) -> int:
        """How many template tokens `build_inputs` adds around one text or a pair."""
        return (2 + self.pair_seps if pair else 2) if self._bert_template else int(pair)

    def build_inputs(self, a: list[int], b: list[int] | None = None) -> tuple[list[int], list[int]]:
        """(ids, token_type_ids): the model's template around already-truncated pieces.

        BERT vocabularies (with [CLS] and [SEP]): `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`, types 0...0 1...1
        (RoBERTa's: `<s> a </s></s> b </s>`, all type 0). Others (GPT): the plain ids of a, or `a <eos> b` for a pair
        (types 0 for a, 1 for `<eos> b`).
        """
        if self._bert_template:
            ids, types = [self.cls_id, *a, self.sep_id], [0] * (len(a) + 2)
            if b is not None:
                extra = [self.sep_id] * (self.pair_seps - 1)
                ids, types = ids + extra + [*b, self.sep_id], types + [0] * len(extra) + [self.pair_type] * (len(b) + 1)
            return ids, types
        if b is None:
            return list(a), [0] * len(a)
        if self.eos_id is None:
            raise TinygraftError("this tokenizer has no [SEP] or end-of-text token to join a sentence pair")
        return [*a, self.eos_id, *b], [0] * len(a) + [1] * (len(b) + 1)

    def encode_for_model(
        self, text: str, pair: str | None = None, max_length: int | None = None
    ) -> tuple[list[int], list[int]]:
        """(ids, token_type_ids) as the model sees them (template of `build_inputs`).

        `max_length` counts the special tokens; a and b are cut like Hugging Face's "longest_first".
        """
        a = self.encode(text)
        b = self.encode(pair) if pair is not None else None
        if b is not None and not self._bert_template and self.eos_id is None:
            raise TinygraftError("this tokenizer has no [SEP] or end-of-text token to join a sentence pair")
        if max_length is not None:
            n_added = self.n_special(pair=b is not None)
            if max_length < n_added:
                raise TinygraftError(f"max_length={max_length} leaves no room for the text and the special tokens")
            a, b = _truncate_longest_first(a, b, max_length - n_added)
        return self.build_inputs(a, b)

    def __repr__(self) -> str:
        return f"TextTokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"


def _truncate_longest_first(a: list[int], b: list[int] | None, budget: int) -> tuple[list[int], list[int] | None]:
    """Cut a (and b) to `budget` tokens in total by the `tokenizers` library's LongestFirst rule (what
    Hugging Face fast tokenizers do): only the longer one shrinks while that is enough, otherwise both are cut to
    half the budget, the odd token going to the one that was longer."""
    if b is None:
        return a[:budget], None
    if len(a) + len(b) <= budget:
        return a, b
    n_short, n_long = sorted((len(a), len(b)))
    n_long = n_short if n_short > budget else max(n_short, budget - n_short)
    if n_short + n_long > budget:
        n_short, n_long = budget // 2, budget // 2 + budget % 2
    if len(a) > len(b):
        return a[:n_long], b[:n_short]
    return a[:n_short], b[:n_long]


def _template_of(tokenizer: Tokenizer) -> tuple[str, str, int, int] | None:
    """(cls token, sep token, separators between a pair, token type of b) of a BERT-style post-processor (BERT's,
    RoBERTa's, or a template `C $A S` / `C $A S [S] $B S`, also inside a Sequence), or None for any other."""
    if tokenizer.post_processor is None:
        return None
    found = json.loads(tokenizer.post_processor.__getstate__())
    steps = found.get("processors", []) if found.get("type") == "Sequence" else [found]
    for p in steps:
        if p.get("type") in ("BertProcessing", "RobertaProcessing"):
            roberta = p["type"] == "RobertaProcessing"
            return p["cls"][0], p["sep"][0], 2 if roberta else 1, 0 if roberta else 1
        if p.get("type") == "TemplateProcessing":
            single = [x.get("SpecialToken", {}).get("id") for x in p["single"]]  # None where $A goes
            if len(single) != 3 or None in single[::2] or single[1] is not None:
                return None
            cls_tok, sep_tok = single[0], single[2]
            pair = [x.get("SpecialToken", {}).get("id") for x in p["pair"]]
            seqs = [x["Sequence"] for x in p["pair"] if "Sequence" in x]
            if len(seqs) != 2 or pair[0] != cls_tok or pair[-1] != sep_tok:
                return None
            middle = pair[pair.index(None) + 1 : len(pair) - 2]  # specials between $A and $B
            if not middle or set(middle) != {sep_tok}:
                return None
            return cls_tok, sep_tok, len(middle), seqs[1]["type_id"]
    return None


# ------------------------------------------------------------------------------------------------- builders
def _train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    if vocab_size < 257:
        raise TinygraftError(f"a byte-level BPE needs vocab_size >= 257 (256 bytes + {EOT}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    # GPT-2 settings: no prefix space, so decode(encode(x)) == x holds exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so no text is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def _bert_pipeline(tok: Tokenizer) -> Tokenizer:
    """The BERT (uncased) normalizer, pre-tokenizer, decoder and [CLS]/[SEP] template, as in bert-base-uncased."""
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls_id is not None and sep_id is not None:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A:0 [SEP]:0",
            pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
    return tok


def _train_wordpiece(texts: list[str], vocab_size: int) -> Tokenizer:
    if vocab_size < len(BERT_SPECIALS) + 1:
        raise TinygraftError(f"a WordPiece vocabulary needs vocab_size > {len(BERT_SPECIALS)}, got {vocab_size}")
    probe = _bert_pipeline(Tokenizer(models.WordPiece(unk_token="[UNK]")))
    # The trainer numbers the `##x` pieces in hash-map order, which changes merge tie-breaks and so the vocabulary
    # from run to run (huggingface/tokenizers#1794). Registering them up front, sorted, makes training
    # deterministic: the same corpus always gives the same tokenizer (and hits the same token cache).
    inner_chars: set[str] = set()
    for text in texts:
        for word, _ in probe.pre_tokenizer.pre_tokenize_str(probe.normalizer.normalize_str(text)):
            inner_chars.update(word[1:])
    continuing = ["##" + c for c in sorted(inner_chars)]
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=BERT_SPECIALS + continuing, show_progress=False
    )
    probe.train_from_iterator(texts, trainer)
    # Rebuild so only the five real specials are special; the `##x` pieces stay ordinary vocabulary entries.
    vocab = probe.get_vocab(with_added_tokens=False)
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.add_special_tokens(BERT_SPECIALS)
    return _bert_pipeline(tok)


def _bert_from_vocab(path: Path) -> Tokenizer:
    """A BERT uncased tokenizer from a vocab.txt (one token per line, the line number is the id)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise TinygraftError(f"vocab file '{path}' is not UTF-8 text") from None
    vocab = {}
    for i, token in enumerate(lines):
        vocab.setdefault(token.rstrip("\r"), i)  # first occurrence wins, as in transformers' load_vocab
    if "[UNK]" not in vocab:
        raise TinygraftError(f"vocab file '{path}' has no [UNK] token, so it is not a BERT WordPiece vocabulary")
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.add_special_tokens([s for s in BERT_SPECIALS if s in vocab])
    return _bert_pipeline(tok)


def tokenizer_json_sha256(tokenizer: TextTokenizer) -> str:
    """A stable hash of the tokenizer's full definition (used to key the token cache)."""
    canonical = json.dumps(json.loads(tokenizer.to_json()), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
