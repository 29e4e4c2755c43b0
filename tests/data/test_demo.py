"""The no-download demo task: stdlib docstrings labelled with their package."""

from collections import Counter

from tinygraft.data.demo import PACKAGES, build_demo_task, first_paragraph, write_demo_task
from tinygraft.data.labeled import LabelMap, read_labeled


def test_demo_task_is_deterministic_balanced_and_disjoint(tmp_path):
    train, val = build_demo_task()
    assert (train, val) == build_demo_task()
    counts = Counter(label for _, label in train + val)
    assert set(counts) == set(PACKAGES)
    assert min(counts.values()) >= 80 and max(counts.values()) <= 160  # capped per class, none tiny
    assert not {t for t, _ in train} & {t for t, _ in val}
    assert 0.1 < len(val) / (len(train) + len(val)) < 0.3
    assert len({t for t, _ in train}) == len(train)  # no repeats
    assert all(len(t.split()) >= 6 and "\n" not in t and "\t" not in t for t, _ in train + val)

    train_path, val_path = write_demo_task(tmp_path)
    rows = read_labeled(train_path)
    assert [(e.text, e.label) for e in rows] == train  # round-trips through the TSV reader, quotes included
    assert LabelMap.build(e.label for e in rows).names == sorted(PACKAGES)
    assert len(read_labeled(val_path)) == len(val)


def test_first_paragraph_only():
    doc = "Return the thing.\n\n    More detail\n    here.\n"
    assert first_paragraph(doc) == "Return the thing."
    assert first_paragraph("Spans\n  two lines.\n\nrest") == "Spans two lines."
