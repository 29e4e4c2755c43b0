"""The when-to-fine-tune decision (analysis/advice.py) over a table of measured inputs: each branch of the tree, the
scores that pick between the cheap methods, the budget and memory cuts, the domain gap."""

import pytest

from tinygraft.analysis import advice as A


def cost(step_s: float, epoch_s: float, peak: float = 1000.0, fits: bool = True) -> A.Cost:
    return A.Cost(step_s, peak, fits, epoch_s)


COSTS = {  # seconds of one epoch: full the dearest, then LoRA, the probe's fit in seconds
    "full": cost(0.6, 60.0, 2000),
    "lora": cost(0.5, 50.0, 1700),
    "linear-probe": cost(0.002, 2.0, 900),
}


def measured(n: int, zs=None, probe=None, costs=None, budget=None, gap=()) -> A.Measured:
    scores = {k: v for k, v in (("zero-shot", zs), ("linear-probe", probe)) if v is not None}
    return A.Measured(n, 32, "accuracy", scores, dict(costs or COSTS), list(gap), budget)


@pytest.mark.parametrize(
    ("n", "pick", "words"),
    [
        (1, "zero-shot", "fewer than 100"),
        (99, "zero-shot", "fewer than 100"),
        (100, "linear-probe", "100-1,000"),
        (999, "linear-probe", "100-1,000"),
        (1000, "full", "1,000-10,000"),
        (9999, "full", "1,000-10,000"),
        (10000, "full", "10,000 or more"),
    ],
)
def test_the_tree_branches_at_its_stated_thresholds(n, pick, words):
    got, sentence = A.branch_of(n)
    assert got == pick and words in sentence and f"{n:,}" in sentence


@pytest.mark.parametrize(("n", "epochs"), [(1, 20), (50, 20), (320, 10), (500, 7), (3200, 1), (5000, 1)])
def test_epochs_give_at_least_min_steps_and_at_most_max_epochs(n, epochs):
    assert A.epochs_for(n, 32) == epochs


def test_few_examples_prompt_unless_the_probe_measures_better():
    a = A.recommend(measured(50, zs=0.70, probe=0.62))
    assert a.method == "zero-shot" and a.epochs == 1 and not a.pretrain_first
    assert any("zero-shot 0.7000" in r and "the linear probe 0.6200" in r for r in a.reasons)
    assert A.recommend(measured(50, zs=0.60, probe=0.71)).method == "linear-probe"


def test_a_few_hundred_examples_take_the_probe_unless_zero_shot_is_ahead():
    assert A.recommend(measured(500, zs=0.60, probe=0.75)).method == "linear-probe"
    assert A.recommend(measured(500, zs=0.80, probe=0.75)).method == "zero-shot"


def test_without_zero_shot_scores_the_probe_is_the_cheapest_pick():
    a = A.recommend(measured(50))  # a task zero-shot cannot score (tokens, qa, ...)
    assert a.method == "linear-probe" and any("classify task" in r for r in a.reasons)


def test_a_lower_is_better_metric_turns_the_comparison():
    m = measured(500, zs=0.5, probe=0.3)
    m.higher_is_better = False
    assert A.recommend(m).method == "linear-probe"
    m.scores = {"zero-shot": 0.2, "linear-probe": 0.3}
    assert A.recommend(m).method == "zero-shot"


def test_thousands_of_examples_fine_tune_with_the_tree_epochs():
    a = A.recommend(measured(5000, zs=0.6, probe=0.75))
    assert a.method == "lora" and a.epochs == A.epochs_for(5000, 32) == a.train_epochs
    assert a.branch.startswith("5,000 labeled examples")
    assert A.recommend(measured(20000)).method == "full"


def test_the_budget_passes_over_what_does_not_fit_it():
    # one epoch of 20,000 examples: full 60 s x 1 epoch; a 55 s budget leaves LoRA, a 10 s one the probe
    a = A.recommend(measured(20000, budget=55))
    assert a.method == "lora" and "above the budget of 55 s" in a.passed_over["full"]
    a = A.recommend(measured(20000, budget=10))
    assert a.method == "linear-probe" and set(a.passed_over) == {"full", "lora"}
    a = A.recommend(measured(20000, budget=1))
    assert a.method == "linear-probe" and any("costs the least" in r for r in a.reasons)


def test_the_budget_counts_every_epoch():
    # 1,000 examples: 4 epochs (32 steps of 32 each); LoRA 50 s x 4 = 200 s
    a = A.recommend(measured(1000, budget=150))
    assert a.train_epochs == 4 and a.method == "linear-probe" and "about 3.3 min" in a.passed_over["lora"]
    assert A.recommend(measured(1000, budget=210)).method == "lora"


def test_between_1000_and_10000_the_cheaper_of_lora_and_full():
    assert A.recommend(measured(5000)).method == "lora"  # 50 s an epoch against 60
    cheap_full = {**COSTS, "full": cost(0.4, 40.0)}
    a = A.recommend(measured(5000, costs=cheap_full))
    assert a.method == "full" and any("full costs less here" in r for r in a.reasons)


@pytest.mark.parametrize(
    ("scores", "pick"),
    [
        ({"zero-shot": 0.70, "linear-probe": 0.765, "lora": 0.82}, "lora"),  # the probe is not enough
        ({"zero-shot": 0.70, "linear-probe": 0.815, "lora": 0.82}, "linear-probe"),  # within a point: the cheaper
        ({"zero-shot": 0.812, "linear-probe": 0.815, "lora": 0.82}, "zero-shot"),
        ({"zero-shot": 0.80, "linear-probe": 0.80, "lora": 0.80}, "zero-shot"),  # a tie: the cheapest
    ],
)
def test_where_scores_decide_the_cheapest_within_a_point_of_the_best(scores, pick):
    m = measured(500)
    m.scores = scores
    a = A.recommend(m)
    assert a.method == pick and any("LoRA: a trial of 7 epochs" in r for r in a.reasons)
    assert a.epochs == (7 if pick == "lora" else 1) and a.train_epochs == 7


@pytest.mark.parametrize(
    ("n", "batch", "lora_seconds", "budget", "runs"),
    [
        (50, 16, 20.0, None, True),  # 4 steps an epoch, 20 epochs: 80 steps
        (999, 16, 9e9, None, True),  # 63 steps an epoch, 2 epochs: 126 steps, however slow the machine is
        (1000, 16, 1.0, None, False),  # the tree's LoRA-or-full branch: timed, not trialled
        (999, 4, 1.0, None, False),  # 250 steps an epoch: over TRIAL_STEPS
        (500, 16, 120.0, 60.0, False),  # over the user's budget
        (500, 16, 50.0, 60.0, True),
    ],
)
def test_the_lora_trial_is_decided_in_steps_and_the_budget_not_this_machines_seconds(n, batch, lora_seconds, budget,
                                                                                       runs):  # fmt: skip
    assert A.runs_trial(n, batch, lora_seconds, budget) is runs


def test_memory_passes_over_a_run_that_does_not_fit_the_device():
    costs = {**COSTS, "full": cost(0.6, 60.0, 30000, fits=False)}
    a = A.recommend(measured(20000, costs=costs))
    assert a.method == "lora" and "30,000 MB" in a.passed_over["full"]


def test_zero_shot_is_never_cut_it_trains_nothing():
    a = A.recommend(measured(50, zs=0.7, probe=0.6, budget=0.001))
    assert a.method == "zero-shot" and not a.passed_over


@pytest.mark.parametrize(
    ("pieces", "unk", "lm", "words"),
    [
        (1.3, 0.0, None, None),
        (2.0, 0.0, None, "pieces per word"),  # 2.0 > 1.5 x 1.3
        (1.3, 0.05, None, "unknown tokens"),
        (1.3, 0.0, 6.5, "LM loss"),  # 6.5 - 5.0 > 1 nat
        (1.3, 0.0, 5.5, None),
    ],
)
def test_the_domain_gap_names_each_measure_over_its_threshold(pieces, unk, lm, words):
    gap = A.domain_gap(pieces, 1.3, unk, lm, 5.0 if lm is not None else None)
    if words is None:
        assert gap == []
    else:
        assert len(gap) == 1 and words in gap[0]
        a = A.recommend(measured(5000, gap=gap))
        assert a.pretrain_first and any("continued pre-training first" in r for r in a.reasons)


@pytest.mark.parametrize(("epochs", "per_epoch", "every"), [(20, 2, 8), (7, 16, 23), (5, 22, None), (1, 157, None)])
def test_a_run_of_many_epochs_evaluates_at_most_five_times(epochs, per_epoch, every):
    assert A.eval_interval(epochs, per_epoch) == every
