"""analysis/probe.py: the probe end to end on tiny random models (one backbone pass per example, through the linear-
probe method's cache), and the probe, the majority baseline and the control task on features built to know the
answer."""

import csv
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from tests.train.finetune_fixtures import BERT_LAYERS, demo_rows, make_bert_dir, make_data, make_gpt_dir
from tinygraft.analysis.probe import control_labels, fit_probe, majority, probe_model
from tinygraft.data.ner import read_tagged
from tinygraft.infer.embed import load_encoder
from tinygraft.tasks.base import DataSettings
from tinygraft.train.distill_losses import blocks_of
from tinygraft.train.finetune import subset

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared CPU (tests/conftest.py)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    texts = [t for t, _ in demo_rows()[0][:300]]
    return {"bert": make_bert_dir(root, texts), "gpt": make_gpt_dir(root, texts), **make_data(root)}


def count_rows(model) -> list[int]:
    """The batch sizes block 0 runs on: every example the backbone reads."""
    seen = []
    blocks_of(model)[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    return seen


def labels_of(path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [row["label"] for row in csv.DictReader(f, delimiter="\t")]


def test_classify_probe_reads_every_layer_with_one_backbone_pass_per_example(files):
    encoder = load_encoder(files["bert"], CPU)
    seen = count_rows(encoder[0])
    data = DataSettings(train=str(files["train"]), val=str(files["val"]))
    report = probe_model(encoder, "classify", data, batch_size=7)  # 7: batches that straddle the files' ends
    n_train, n_val = len(labels_of(files["train"])), len(labels_of(files["val"]))
    assert len(set(labels_of(files["train"]))) == 2
    assert [r["layer"] for r in report["layers"]] == list(range(BERT_LAYERS + 1))
    assert sum(seen) == report["backbone_examples"] == n_train + n_val
    assert report["rows"] == {"train": n_train, "val": n_val}
    train_counts = Counter(labels_of(files["train"]))
    top = max(sorted(train_counts), key=train_counts.__getitem__)
    val = labels_of(files["val"])
    assert report["majority"] == {"label": top, "accuracy": pytest.approx(val.count(top) / len(val), abs=1e-12)}
    for r in report["layers"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["train_accuracy"] <= 1.0
    # the fit draws nothing: a second run gives the same numbers; validating on the training file reads the cache
    seen.clear()
    again = probe_model(encoder, "classify", DataSettings(train=str(files["train"]), val=str(files["train"])))
    assert sum(seen) == again["backbone_examples"] == n_train
    same = probe_model(encoder, "classify", data, batch_size=7)
    assert same["layers"] == report["layers"]


def test_tokens_probe_tags_the_first_sub_token_of_each_word_beside_the_control_task(files):
    encoder = load_encoder(files["gpt"], CPU)
    seen = count_rows(encoder[0])
    sentences = subset(read_tagged(files["tags"]), 16)
    data = DataSettings(train=str(files["tags"]), val=str(files["tags"]), max_train=16)
    report = probe_model(encoder, "tokens", data)
    assert len(report["layers"]) == 2 + 1
    assert report["rows"] == {"train": sum(len(s.words) for s in sentences), "val": report["rows"]["val"]}
    assert sum(seen) == report["backbone_examples"] == 24  # the 16 training sentences are among the 24 of --val
    for r in report["layers"]:
        assert r["selectivity"] == pytest.approx(r["accuracy"] - r["control_accuracy"], abs=1e-12)


def test_a_layer_that_encodes_the_label_linearly_probes_to_one_and_noise_to_the_majority():
    g = torch.Generator().manual_seed(0)
    y = torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), 600, replacement=True, generator=g)
    noise = torch.randn(600, 16, generator=g, dtype=torch.float64)
    encoded = noise.clone()
    encoded[:, :3] += 4 * F.one_hot(y, 3)  # the label, linearly, in three of sixteen dimensions
    train, val = slice(0, 400), slice(400, 600)
    assert fit_probe(encoded[train], y[train], 3).accuracy(encoded[val], y[val]) > 0.99
    _, baseline = majority(y[train], y[val], 3)
    assert fit_probe(noise[train], y[train], 3).accuracy(noise[val], y[val]) < baseline + 0.05


def test_control_task_is_at_chance_without_word_identity_and_memorised_with_it():
    """Zipf-distributed word types; control labels from a skewed label distribution. Features that carry no word
    identity cannot predict a type's control label: the control probe falls back to the majority control label.
    Features that are the word identity (one-hot) memorise it: near 1 on types seen in training."""
    g = torch.Generator().manual_seed(1)
    zipf = torch.tensor([1 / (i + 1) for i in range(60)])
    ids = torch.multinomial(zipf, 4000, replacement=True, generator=g)
    words = [f"w{i}" for i in ids.tolist()]
    distribution = torch.bincount(torch.multinomial(torch.tensor([0.6, 0.3, 0.1]), 3000, True, generator=g))
    control = control_labels(words, distribution, seed=0)
    train, val = slice(0, 3000), slice(3000, 4000)
    top, chance = majority(control[train], control[val], 3)
    noise = torch.randn(4000, 16, generator=g, dtype=torch.float64)
    acc = fit_probe(noise[train], control[train], 3).accuracy(noise[val], control[val])
    assert chance - 0.05 < acc <= chance + 0.01
    identity = F.one_hot(ids, 60).double()
    assert fit_probe(identity[train], control[train], 3).accuracy(identity[val], control[val]) > 0.98


def test_control_labels_are_fixed_per_word_type_and_follow_the_training_distribution():
    distribution = torch.tensor([70, 20, 10])
    words = [f"type{i}" for i in range(6000)]
    labels = control_labels(words, distribution, seed=3)
    assert torch.equal(control_labels(list(reversed(words)), distribution, seed=3), labels.flip(0))  # order-free
    again = control_labels(["type7", "x", "type7"], distribution, seed=3)  # a type's label: its own, wherever it is
    assert again[0] == again[2] == labels[7]
    assert not torch.equal(control_labels(words, distribution, seed=4), labels)
    shares = torch.bincount(labels, minlength=3) / len(words)
    torch.testing.assert_close(shares, torch.tensor([0.7, 0.2, 0.1]), rtol=0, atol=0.03)  # 6,000 draws: std < 0.006


def test_majority_baseline():
    assert majority(torch.tensor([0, 1, 1, 2]), torch.tensor([1, 1, 0]), 3) == (1, pytest.approx(2 / 3))
    assert majority(torch.tensor([2, 0, 2, 0]), torch.tensor([2, 2, 2, 2]), 3) == (0, 0.0)  # a tie: the lowest id
