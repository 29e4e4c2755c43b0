"""Hugging Face hub cache entries (models/hub.py) read in place: a fake cache laid out as huggingface_hub lays it
out (refs/, snapshots/<commit>/ of symlinks into blobs/), by path, by `hf:` id, at a revision, and from the CLI."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.train.finetune_fixtures import demo_rows, make_data
from tinygraft.cli.main import main
from tinygraft.data.tokenizer import TextTokenizer
from tinygraft.errors import TinygraftError
from tinygraft.models import hub
from tinygraft.models.bert import BERT, BERTConfig
from tinygraft.models.pretrained import load_pretrained_model, locate, record_name, resolve_pretrained
from tinygraft.train import runs

REPO = "org/tiny-bert"
MAIN, OTHER = "a" * 40, "b" * 40  # the commits main and the tag v1 point at


def add_commit(entry, commit, source):
    """Every file of `source` as the hub stores it: the bytes once in blobs/, a relative symlink in the snapshot."""
    (entry / "blobs").mkdir(parents=True, exist_ok=True)
    snap = entry / "snapshots" / commit
    snap.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        data = file.read_bytes()
        blob = entry / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / file.name).symlink_to(f"../../blobs/{blob.name}")


def set_ref(entry, name, commit):
    ref = entry / "refs" / name
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)  # the hub writes the hash without a newline


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Two small BERTs (one tokenizer) saved plainly, and a cache holding them as main and as the tag v1."""
    root = tmp_path_factory.mktemp("hub")
    tok = TextTokenizer.train([t for t, _ in demo_rows()[0]], "wordpiece", 400)
    cfg = BERTConfig(vocab_size=tok.vocab_size, max_position_embeddings=64, n_layer=2, n_head=2, n_embd=32,
                     intermediate_size=37)  # fmt: skip
    plain = {}
    for commit, seed in ((MAIN, 0), (OTHER, 1)):
        torch.manual_seed(seed)
        plain[commit] = BERT(cfg).save_pretrained(root / f"plain-{seed}", tok)
    entry = root / "cache" / "models--org--tiny-bert"
    for commit, source in plain.items():
        add_commit(entry, commit, source)
    set_ref(entry, "main", MAIN)
    set_ref(entry, "v1", OTHER)
    return root, entry, plain, tok


@pytest.fixture
def cache(made, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(made[1].parent))
    return made


def hidden(path):
    model = load_pretrained_model(path)
    ids = torch.randint(5, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        return model(ids, mask).last_hidden_state


def test_the_fake_cache_is_laid_out_as_the_hub_lays_it_out(made):
    _, entry, _, _ = made
    weights = entry / "snapshots" / MAIN / "model.safetensors"
    assert weights.is_symlink() and weights.resolve().parent == (entry / "blobs").resolve()
    assert (entry / "refs" / "main").read_text() == MAIN


def test_an_entry_by_path_and_by_id_is_its_main_snapshot(cache):
    _, entry, plain, _ = cache
    snap = entry / "snapshots" / MAIN
    assert resolve_pretrained(entry) == snap
    assert resolve_pretrained(f"hf:{REPO}") == snap
    want = hidden(plain[MAIN])
    for spec in (entry, f"hf:{REPO}", snap):
        torch.testing.assert_close(hidden(resolve_pretrained(spec)), want, rtol=0, atol=0)


@pytest.mark.parametrize("revision", ["v1", OTHER])
def test_a_revision_is_a_ref_or_a_commit(cache, revision):
    _, entry, plain, _ = cache
    snap = entry / "snapshots" / OTHER
    assert resolve_pretrained(entry, revision) == snap
    assert resolve_pretrained(f"hf:{REPO}", revision) == snap
    assert resolve_pretrained(f"hf:{REPO}@{revision}") == snap
    assert resolve_pretrained(f"hf:{REPO}@{revision}", revision) == snap
    got = hidden(resolve_pretrained(f"hf:{REPO}@{revision}"))
    torch.testing.assert_close(got, hidden(plain[OTHER]), rtol=0, atol=0)
    assert not torch.allclose(got, hidden(plain[MAIN]))


def test_a_bare_org_name_stays_a_path(cache, tmp_path, monkeypatch):
    assert resolve_pretrained(REPO) == Path(REPO)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TinygraftError, match=f"checkpoint path '{REPO}' does not exist"):
        runs.locate_spec(REPO)


def test_cache_dir_follows_the_hub_clients_order(monkeypatch, tmp_path):
    for var in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub.cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hub.cache_dir() == tmp_path / "c"


def test_a_run_records_the_id_at_its_commit_and_reads_it_again_elsewhere(cache, tmp_path, monkeypatch):
    root, entry, _, _ = cache
    assert record_name(resolve_pretrained(f"hf:{REPO}")) == f"hf:{REPO}@{MAIN}"
    assert record_name(entry) == f"hf:{REPO}@{MAIN}"
    assert record_name(resolve_pretrained(entry, "v1")) == f"hf:{REPO}@{OTHER}"
    assert locate(f"hf:{REPO}@{OTHER}") == entry / "snapshots" / OTHER
    moved = tmp_path / "other-cache"
    shutil.copytree(entry.parent, moved, symlinks=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(moved))
    assert locate(f"hf:{REPO}@{OTHER}") == moved / entry.name / "snapshots" / OTHER
    # an entry outside this machine's cache has no id that finds it again: its path is recorded
    assert record_name(entry) == str((entry / "snapshots" / MAIN).resolve())


def test_finetune_from_an_id_records_it_and_its_adapter_run_reads_again(cache, tmp_path, monkeypatch):
    _, entry, _, _ = cache
    first, second = tmp_path / "cache", tmp_path / "moved"
    shutil.copytree(entry.parent, first, symlinks=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(first))
    data = make_data(tmp_path)
    run = tmp_path / "run"
    argv = ["finetune", "--from", f"hf:{REPO}", "--revision", "v1", "--method", "lora", "--train", data["train"],
            "--val", data["val"], "--steps", "2", "--batch-size", "8", "--out", run]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["finetune"]["source"] == f"hf:{REPO}@{OTHER}"
    before = runs.load(run).model.state_dict()
    first.rename(second)  # the adapter run reads its base again from wherever this machine's cache is now
    monkeypatch.setenv("HF_HUB_CACHE", str(second))
    after = runs.load(run).model.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(before[name], after[name], rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------------------------------- bad input
def test_a_missing_entry_names_the_path_looked_at(cache):
    looked = cache[1].parent / "models--org--absent"
    with pytest.raises(TinygraftError, match=f"no Hugging Face hub cache entry for 'org/absent' at '{looked}'"):
        resolve_pretrained("hf:org/absent")


def test_a_missing_revision_names_the_paths_looked_at(cache):
    entry = cache[1]
    with pytest.raises(TinygraftError, match=f"has no revision 'v9' \\(looked for '{entry}/refs/v9' and"):
        resolve_pretrained(f"hf:{REPO}", "v9")
    with pytest.raises(TinygraftError, match="has no revision 'v9'"):
        resolve_pretrained(entry, "v9")


def test_a_ref_to_a_missing_snapshot_says_the_entry_is_incomplete(cache, tmp_path):
    entry = tmp_path / "models--org--half"
    (entry / "snapshots").mkdir(parents=True)
    set_ref(entry, "main", "c" * 40)
    with pytest.raises(TinygraftError, match="the cache entry is incomplete"):
        resolve_pretrained(entry)


@pytest.mark.parametrize(
    "spec,match",
    [
        ("hf:", "is not a hub model id"),
        ("hf:a/b/c", "is not a hub model id"),
        ("hf:org/x--y", "is not a hub model id"),
        (f"hf:{REPO}@", "without a revision"),
    ],
)
def test_malformed_ids(cache, spec, match):
    with pytest.raises(TinygraftError, match=match):
        resolve_pretrained(spec)


def test_a_revision_of_something_else_or_two_revisions(cache):
    _, _, plain, _ = cache
    with pytest.raises(TinygraftError, match="--revision applies to a Hugging Face hub cache entry"):
        resolve_pretrained(plain[MAIN], "v1")
    with pytest.raises(TinygraftError, match="names revision 'v1' and --revision names 'main'; give one"):
        resolve_pretrained(f"hf:{REPO}@v1", "main")
    with pytest.raises(TinygraftError, match="is not a revision name"):
        resolve_pretrained(f"hf:{REPO}", "../../elsewhere")


# ------------------------------------------------------------------------------------------------------- CLI
def test_info_on_an_entry_by_path_by_id_and_at_a_revision(cache, capsys):
    _, entry, _, _ = cache
    assert main(["info", str(entry)]) == 0
    assert f"pretrained   {entry / 'snapshots' / MAIN} (Hugging Face layout" in capsys.readouterr().out
    assert main(["info", f"hf:{REPO}", "--revision", "v1", "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["path"] == str(entry / "snapshots" / OTHER) and described["tokenizer"]["kind"] == "wordpiece"


@pytest.mark.parametrize(
    "argv,match",
    [
        (["info", "hf:org/absent"], "no Hugging Face hub cache entry for 'org/absent' at '"),
        (["info", f"hf:{REPO}", "--revision", "v9"], "has no revision 'v9' (looked for '"),
        (["info", "minilm", "--revision", "v1"], "--revision applies to a Hugging Face hub cache entry"),
        (["pretrain", "--out", "x", "--revision", "v1"], "no --from was given"),
        (["finetune", "--out", "x", "--revision", "v1"], "no --from was given"),
    ],
)
def test_bad_hub_input_exits_2_with_one_sentence(cache, capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and "Traceback" not in err and err.count("\n") == 1


def test_embed_from_an_id_at_a_revision(cache, tmp_path):
    _, entry, plain, _ = cache
    (tmp_path / "in.txt").write_text("a logging handler\nan event loop\n")
    for spec, extra, name in ((f"hf:{REPO}", ["--revision", "v1"], "id"), (plain[OTHER], [], "plain")):
        out = tmp_path / f"{name}.npy"
        argv = ["embed", "--from", str(spec), *extra, "--input", str(tmp_path / "in.txt"), "--output", str(out)]
        assert main(argv) == 0
    assert (tmp_path / "id.npy").read_bytes() == (tmp_path / "plain.npy").read_bytes()
