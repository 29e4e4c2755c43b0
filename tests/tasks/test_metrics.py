"""Each metric against examples worked by hand (the arithmetic is in the comments), and against scipy where it is
installed (it is not a dependency)."""

import math

import numpy as np
import pytest
import torch

from tinygraft.data.labeled import LabelMap
from tinygraft.data.ner import TaggedSentence
from tinygraft.errors import TinygraftError
from tinygraft.tasks import get_task
from tinygraft.tasks.classify import ClassifySettings
from tinygraft.tasks.metrics import (
    accuracy,
    answer_f1,
    average_ranks,
    entity_f1,
    entity_spans,
    macro_f1,
    multi_label_metrics,
    normalize_answer,
    pearson,
    perplexity,
    spearman,
    squad_metrics,
)


def test_accuracy_and_macro_f1():
    pred, gold = [0, 1, 1, 2, 0], [0, 1, 2, 2, 1]
    assert accuracy(pred, gold) == pytest.approx(3 / 5)
    # class 0: tp 1, fp 1, fn 0 -> 2/3;  class 1: tp 1, fp 1, fn 1 -> 1/2;  class 2: tp 1, fp 0, fn 1 -> 2/3
    assert macro_f1(pred, gold) == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    # a class only predicted counts (F1 0), as scikit-learn: class a 2/3, class b 0
    assert macro_f1(["a", "b"], ["a", "a"]) == pytest.approx(1 / 3)
    with pytest.raises(TinygraftError, match="3 predictions for 2"):
        accuracy([1, 2, 3], [1, 2])


def test_entity_spans_strict_iob2():
    assert entity_spans(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 1), ("LOC", 3, 3)}
    assert entity_spans(["I-PER", "I-PER", "O"]) == set()  # no B-: no entity in strict mode
    assert entity_spans(["B-PER", "I-LOC", "I-LOC"]) == {("PER", 0, 0)}  # a type change ends it
    assert entity_spans(["B-ORG", "B-ORG", "I-ORG"]) == {("ORG", 0, 0), ("ORG", 1, 2)}
    with pytest.raises(TinygraftError, match="'PER' is not IOB2"):
        entity_spans(["PER"])


def test_entity_f1_micro_over_sentences():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "I-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "I-ORG", "O", "O"]]
    # gold: PER(0-1) LOC(3) ORG(0-2); pred: PER(0-1) ORG(3) ORG(0-1); only PER matches type and span exactly
    m = entity_f1(pred, gold)
    assert m["entity_precision"] == pytest.approx(1 / 3)
    assert m["entity_recall"] == pytest.approx(1 / 3)
    assert m["entity_f1"] == pytest.approx(1 / 3)
    # 2 of 2 predicted right, 2 of 3 gold found: P 1, R 2/3, F1 = 2 * 2/3 / (5/3) = 0.8
    pred2 = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "O", "O", "O"]]
    assert entity_f1(pred2, gold)["entity_f1"] == pytest.approx(0.8)
    assert entity_f1([["I-PER", "I-PER", "O"]], [["B-PER", "I-PER", "O"]])["entity_f1"] == 0.0


def test_squad_normalisation_and_scores():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear; the end.") == "apple pear end"
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words
    # pred [denver, broncos, team] vs gold [denver, broncos]: common 2, P 2/3, R 1, F1 0.8
    assert answer_f1("Denver Broncos team", "the Denver Broncos") == pytest.approx(0.8)
    m = squad_metrics(["Denver Broncos", "in 1990"], [["The Broncos", "Denver Broncos"], ["in 1991", "1991"]])
    # EM: 1 (second gold), 0; F1: 1, max(1/2 ([in] of 2 and 2), 0) = 1/2
    assert m == {"exact_match": pytest.approx(0.5), "f1": pytest.approx(0.75)}


def test_pearson_spearman_with_ties():
    # x - 2.5 = [-1.5, -.5, .5, 1.5], y - 5 = [-3, -1, 0, 4]: r = 11 / sqrt(5 * 26)
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))
    np.testing.assert_allclose(average_ranks([10, 20, 10, 30, 20, 20]), [1.5, 4, 1.5, 6, 4, 4])
    # ranks x [1, 2.5, 2.5, 4], y [1, 3, 2, 4]: r = 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10))
    assert spearman([1, 2, 3], [10, 200, 3000]) == pytest.approx(1.0)  # monotone, not linear
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


def test_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats", reason="scipy is an optional cross-check, not a dependency")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 6, 129).astype(float), rng.normal(size=129)  # many ties in x
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)


def test_perplexity():
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert perplexity(1e4) == float("inf")


def test_multi_label_metrics():
    pred = np.array([[1, 0, 1], [0, 1, 0]])
    gold = np.array([[1, 0, 1], [1, 1, 0]])
    # subset accuracy 1/2; per label F1: label 0 tp 1 fn 1 -> 2/3, label 1 tp 1 -> 1, label 2 tp 1 -> 1
    m = multi_label_metrics(pred, gold)
    assert m["accuracy"] == 0.5 and m["macro_f1"] == pytest.approx((2 / 3 + 1 + 1) / 3)


def test_task_scorers_from_model_outputs():
    s = get_task("classify").scorer(ClassifySettings(), None, [], [])
    batch = {"input_ids": torch.ones(3, 4, dtype=torch.long), "labels": torch.tensor([0, 2, 1])}
    s.add({"logits": torch.tensor([[2.0, 0, 0], [0, 0, 1], [0, 0, 3]])}, batch, torch.tensor(0.5))
    s.add({"logits": torch.tensor([[0.0, 1, 0]])}, {"input_ids": torch.ones(1, 2), "labels": torch.tensor([1])}, 1.5)
    # preds 0 2 2 1 vs gold 0 2 1 1: accuracy 3/4; loss weighted by examples (3 * .5 + 1.5) / 4
    assert s.result()["accuracy"] == pytest.approx(0.75) and s.result()["loss"] == pytest.approx(0.75)

    lm = get_task("instruct").scorer(None, None, [], [])
    lm.add({"n_targets": torch.tensor(3)}, {"input_ids": torch.ones(2, 5)}, math.log(2.0))
    lm.add({"n_targets": torch.tensor(1)}, {"input_ids": torch.ones(1, 5)}, math.log(32.0))
    # token-weighted mean loss (3 ln 2 + 5 ln 2) / 4 = 2 ln 2 -> perplexity 4
    assert lm.result()["perplexity"] == pytest.approx(4.0)

    tags = LabelMap(["O", "B-PER", "I-PER"])
    sents = [TaggedSentence(["Peter", "Blackburn", "went"], ["B-PER", "I-PER", "O"], 1)]
    ner = get_task("tokens").scorer(None, tags, sents, [])
    logits = torch.zeros(1, 6, 3)
    # [CLS] Pe ##ter Black ##burn went -> word ids -1 0 0 1 1 2; only first sub-words are read
    for t, k in [(1, 1), (2, 0), (3, 2), (4, 0), (5, 0)]:
        logits[0, t, k] = 5.0
    ner.add({"logits": logits}, {"input_ids": torch.ones(1, 6), "word_ids": [[-1, 0, 0, 1, 1, 2]]})
    assert ner.result()["entity_f1"] == 1.0
