"""A fine-tuned run hands its backbone to `export` and `embed` (the task head has no place in the HF layout)."""

import numpy as np
import pytest
import torch

from tests.train.finetune_fixtures import demo_rows, make_bert_dir, make_data
from tinygraft.cli.main import main
from tinygraft.train import runs


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    train, _ = demo_rows()
    bert = make_bert_dir(root, [t for t, _ in train])
    data = make_data(root)
    argv = ["finetune", "--from", str(bert), "--train", str(data["train"]), "--val", str(data["val"])]
    assert main([*argv, "--steps", "3", "--batch-size", "8", "--out", str(root / "run")]) == 0
    return root, data


def test_export_writes_the_fine_tuned_backbone(finetuned):
    transformers = pytest.importorskip("transformers")
    root, _ = finetuned
    assert main(["export", str(root / "run"), "--to", str(root / "exported")]) == 0
    ours = runs.load(root / "run").model.backbone
    theirs = transformers.BertModel.from_pretrained(root / "exported").eval()
    ids = torch.randint(5, 300, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        a = ours(ids, mask).last_hidden_state
        b = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], rtol=1e-5, atol=1e-5)


def test_embed_from_a_fine_tuned_run(finetuned, tmp_path):
    root, data = finetuned
    texts = tmp_path / "texts.txt"
    texts.write_text("a logging handler\nan event loop\n", encoding="utf-8")
    out = tmp_path / "e.npy"
    assert main(["embed", "--from", str(root / "run"), "--input", str(texts), "--output", str(out)]) == 0
    emb = np.load(out)
    assert emb.shape == (2, 32) and np.isfinite(emb).all()
