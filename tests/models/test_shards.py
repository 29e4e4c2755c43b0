"""Sharded safetensors checkpoints: read a shard (a tensor) at a time, and written as transformers writes them
(`model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`), by `save_pretrained` and `tinygraft export`."""

import inspect
import json
import weakref

import pytest
import torch
from safetensors import safe_open

from tinygraft.cli.main import main
from tinygraft.errors import TinygraftError
from tinygraft.models import BERT, GPT, hf
from tinygraft.models.pretrained import load_pretrained_model
from tinygraft.train import runs as run_loader
from tinygraft.train.pretrain import PretrainArgs, pretrain

transformers = pytest.importorskip("transformers", reason="transformers is the reference (dev extra)")
V, P = 99, 24


def hf_model(name):
    torch.manual_seed(1)
    if name == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=V, n_positions=P, n_embd=32, n_layer=2, n_head=2)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.BertConfig(vocab_size=V, max_position_embeddings=P, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=37)  # fmt: skip
        model = transformers.BertModel(cfg)
    with torch.no_grad():  # fresh LayerNorms are identity and biases zero: make every tensor matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def outputs(model, ids):
    with torch.no_grad():
        if isinstance(model, GPT):
            return model(ids)[0]
        if isinstance(model, BERT):
            return model(ids, torch.ones_like(ids)).last_hidden_state
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def index_of(path):
    return json.loads((path / hf.WEIGHTS_INDEX).read_text())


class CountingOpen:
    """safe_open whose tensors are counted while alive: the most held at once is the most loaded and not yet
    copied into the model (each is dropped once copied), measured without timing or RSS."""

    def __init__(self):
        self.alive, self.peak, self.read = 0, 0, 0

    def _gone(self):
        self.alive -= 1

    def __call__(self, *args, **kwargs):
        counter, real = self, safe_open(*args, **kwargs)

        class Counted:
            def __enter__(self):
                self.f = real.__enter__()
                return self

            def __exit__(self, *exc):
                return real.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def get_slice(self, name):
                return self.f.get_slice(name)

            def get_tensor(self, name):
                t = self.f.get_tensor(name)
                counter.alive, counter.read = counter.alive + 1, counter.read + 1
                counter.peak = max(counter.peak, counter.alive)
                weakref.finalize(t, counter._gone)
                return t

        return Counted()


# ---------------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("name,cls", [("bert", BERT), ("gpt2", GPT)])
def test_transformers_shards_load_a_shard_at_a_time(tmp_path, monkeypatch, name, cls):
    ref = hf_model(name)
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(set(index_of(tmp_path)["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / hf.WEIGHTS).exists()
    counter = CountingOpen()
    monkeypatch.setattr(hf, "safe_open", counter)
    model = cls.from_pretrained(tmp_path)
    per_shard = [len(safe_open(str(tmp_path / s), "pt").keys()) for s in shards]
    assert counter.read == sum(per_shard) - len(model.load_report.unused_tensors)
    assert counter.peak <= max(per_shard) < sum(per_shard)  # never the whole checkpoint beside the model
    assert counter.alive == 0
    ids = torch.randint(1, V, (2, 9))
    torch.testing.assert_close(outputs(model, ids), outputs(ref, ids), rtol=1e-5, atol=1e-5)


def test_an_index_naming_a_missing_shard_is_one_sentence(tmp_path):
    hf_model("bert").save_pretrained(tmp_path, max_shard_size="20KB")
    gone = sorted(set(index_of(tmp_path)["weight_map"].values()))[-1]
    (tmp_path / gone).unlink()
    with pytest.raises(TinygraftError, match=f"lacks the weights shard '{gone}' that model.safetensors.index.json"):
        BERT.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize(
    "size,want",
    [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("200KB", 200_000), ("2GiB", 2 * 2**30), ("3 mib", 3 * 2**20),
     ("1.5GB", 1_500_000_000), ("1000", 1000), (1000, 1000), ("1TB", 10**12), ("64B", 64)],
)  # fmt: skip
def test_sizes_read_as_transformers_reads_them(size, want):
    assert hf.parse_size(size) == want


@pytest.mark.parametrize("size", ["5XB", "", "GB", "-1MB", "0", 0, "5 G B", "1e9"])
def test_a_bad_size_is_one_sentence(size):
    with pytest.raises(TinygraftError, match="--max-shard-size .* is not a size"):
        hf.parse_size(size)


def test_default_shard_size_is_transformers_default():
    default = inspect.signature(transformers.PreTrainedModel.save_pretrained).parameters["max_shard_size"].default
    assert hf.parse_size(hf.MAX_SHARD_SIZE) == hf.parse_size(default)


def test_split_matches_huggingface_hub():
    split = pytest.importorskip("huggingface_hub").split_torch_state_dict_into_shards
    tensors = {n: t.detach().contiguous() for n, t in hf.own_tensors(hf_model("bert")).items()}
    tensors["big"] = torch.zeros(40_000 // 4 + 1)  # larger than the limit: a shard of its own
    ours = [list(s) for s in hf.split_shards(tensors, 20_000)]
    theirs = split(tensors, max_shard_size=20_000, filename_pattern="model{suffix}.safetensors")
    assert ours == list(theirs.filename_to_tensors.values())


# ---------------------------------------------------------------------------------------------------- writing
@pytest.mark.parametrize("name,cls", [("bert", BERT), ("gpt2", GPT)])
def test_save_pretrained_shards_load_in_transformers_and_back(tmp_path, name, cls):
    ours = cls.from_pretrained(_saved(tmp_path / "src", name))
    ours.save_pretrained(tmp_path / "out", max_shard_size="20KB")
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    index = index_of(tmp_path / "out")
    n = len(set(index["weight_map"].values()))
    assert n > 2 and files == sorted(
        ["config.json", hf.WEIGHTS_INDEX, *(hf.SHARD.format(i, n) for i in range(1, n + 1))]
    )
    sizes = 0
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(tmp_path / "out" / shard), "pt") as f:
            sizes += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert index["metadata"]["total_size"] == sizes
    auto = transformers.AutoModelForCausalLM if name == "gpt2" else transformers.AutoModel
    theirs, info = auto.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(1, V, (2, 9))
    torch.testing.assert_close(outputs(theirs.eval(), ids), outputs(ours, ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs(cls.from_pretrained(tmp_path / "out"), ids), outputs(ours, ids), rtol=0, atol=0)


def _saved(path, name):
    hf_model(name).save_pretrained(path)
    return path


def test_resaving_replaces_the_old_weights_layout(tmp_path):
    model = BERT.from_pretrained(_saved(tmp_path / "src", "bert"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    model.save_pretrained(tmp_path / "out", max_shard_size="20KB")
    model.save_pretrained(tmp_path / "out")  # one file now: the shards and their index must go
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
    model.save_pretrained(tmp_path / "out", max_shard_size="20KB")
    assert not (tmp_path / "out" / hf.WEIGHTS).exists()  # else loaders would read the stale single file
    ids = torch.randint(1, V, (1, 7))
    torch.testing.assert_close(outputs(BERT.from_pretrained(tmp_path / "out"), ids), outputs(model, ids))


# ------------------------------------------------------------------------------------------------------ export
SETTINGS = ["data.vocab_size=300", "train.batch_size=2", "train.seq_len=16", "train.eval_every=2",
            "train.eval_batches=1", "train.warmup_steps=1", "train.log_every=1", "model.n_layer=2", "model.n_head=2",
            "model.n_embd=32"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    corpus = "\n".join(f"Line {i}: the model reads tokens and the loss falls as it learns {i % 7}." for i in range(80))
    (root / "corpus.txt").write_text(corpus)
    out = {}
    for preset, extra in (("gpt-tiny", ["model.block_size=32"]), ("bert-tiny", ["model.intermediate_size=37"])):
        args = PretrainArgs(out=str(root / preset), preset=preset, data=str(root / "corpus.txt"), steps=1,
                            device="cpu", sets=SETTINGS + extra)  # fmt: skip
        pretrain(args)
        out[preset] = root / preset
    return out


@pytest.mark.parametrize("preset,auto", [("gpt-tiny", "AutoModelForCausalLM"), ("bert-tiny", "AutoModelForMaskedLM")])
def test_export_max_shard_size_loads_in_transformers_and_back(runs, tmp_path, capsys, preset, auto):
    run, to = runs[preset], tmp_path / "hf"
    assert main(["export", str(run), "--to", str(to), "--max-shard-size", "40KB"]) == 0
    assert "exported" in capsys.readouterr().out
    index = index_of(to)
    n = len(set(index["weight_map"].values()))
    assert n > 1 and (to / hf.SHARD.format(n, n)).is_file() and not (to / hf.WEIGHTS).exists()
    trained = run_loader.load(run).model
    theirs = getattr(transformers, auto).from_pretrained(to).eval()
    back = load_pretrained_model(to, "lm")
    ids = torch.randint(5, trained.config.vocab_size, (2, 9))
    with torch.no_grad():
        want = trained(ids)[0]
        torch.testing.assert_close(theirs(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back(ids)[0], want, rtol=0, atol=0)


def test_export_default_writes_one_file(runs, tmp_path):
    assert main(["export", str(runs["bert-tiny"]), "--to", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / hf.WEIGHTS).is_file() and not (tmp_path / "hf" / hf.WEIGHTS_INDEX).exists()


@pytest.mark.parametrize(
    "argv", [["--to", "hf", "--max-shard-size", "5XB"], ["--adapter", "a", "--max-shard-size", "1MB"]]
)
def test_export_bad_max_shard_size_exits_2(runs, tmp_path, capsys, argv):
    argv = [str(tmp_path / a) if a in ("hf", "a") else a for a in argv]
    assert main(["export", str(runs["gpt-tiny"]), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --max-shard-size") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "a").exists()
