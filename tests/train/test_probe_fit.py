"""The linear probe fitted to convergence (train/probe_fit.py): on a tiny BERT's cached features it equals a logistic
regression fitted in float64 by scipy's L-BFGS-B (the objective written here), to a bound derived from the two
optimizers' gradient tolerances; `finetune --method linear-probe` reports the fit and leaves a normal run; and
--probe-epochs / --steps step the head as before."""

import json

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from tests.cli.tiny_runs import run_cli as run
from tests.train.finetune_fixtures import make_env
from tinygraft.core import checkpoint
from tinygraft.data.labeled import LabeledBatcher
from tinygraft.models.heads import TaskModel
from tinygraft.models.pretrained import load_pretrained
from tinygraft.tasks import get_task, make_head
from tinygraft.tasks.base import DataSettings
from tinygraft.train.methods.freezing import LinearProbe
from tinygraft.train.probe_fit import GRAD_TOL, fit_linear, pooled_features

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
SCIPY_GTOL = GRAD_TOL  # L-BFGS-B's: max |projected gradient| (float64 reaches ~1e-9 here before F stalls)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("probe"))


def features(env, path):
    """(X, y) of a data file: the tiny BERT's mean-pooled features through the linear probe's cache, as finetune
    computes them."""
    pre = load_pretrained(env["bert"])
    model = LinearProbe().attach(TaskModel(pre.model, make_head("classify", pre.model, num_labels=2, pooling="mean")))
    task, data = get_task("classify"), DataSettings(max_length=32)
    settings = task.Settings()
    train = task.read(str(env["train"]), data, settings)
    examples = task.read(str(path), data, settings)
    encoded = task.encode(examples, pre.tokenizer, data, settings, task.label_map(train, settings), str(path))
    x, y, _ = pooled_features(model, encoded, 16, pre.tokenizer.pad_id)
    return x, y


# ------------------------------------------------------------------------------------------- the reference
def softmax_objective(theta, x, y, k, l2):
    """mean softmax cross-entropy + l2/2 ||W||^2 (the bias unpenalised) and its gradient; theta = [W (k, c), b]."""
    n, c = x.shape
    w, b = theta[: k * c].reshape(k, c), theta[k * c :]
    z = x @ w.T + b
    z = z - z.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    loss = -np.log(p[np.arange(n), y]).mean() + 0.5 * l2 * (w * w).sum()
    d = p.copy()
    d[np.arange(n), y] -= 1
    d /= n
    return loss, np.concatenate([(d.T @ x + l2 * w).ravel(), d.sum(0)])


def bce_objective(theta, x, y, k, l2):
    """mean binary cross-entropy over every (example, label) + l2/2 ||W||^2, and its gradient."""
    n, c = x.shape
    w, b = theta[: k * c].reshape(k, c), theta[k * c :]
    z = x @ w.T + b
    loss = (np.logaddexp(0, z) - y * z).mean() + 0.5 * l2 * (w * w).sum()
    d = (1 / (1 + np.exp(-z)) - y) / (n * k)
    return loss, np.concatenate([(d.T @ x + l2 * w).ravel(), d.sum(0)])


def reference(objective, x, y, k, l2):
    c = x.shape[1]
    res = minimize(objective, np.zeros(k * (c + 1)), args=(x, y, k, l2), jac=True, method="L-BFGS-B",
                   options={"gtol": SCIPY_GTOL, "ftol": 0.0, "maxiter": 100_000, "maxcor": 20})  # fmt: skip
    assert np.abs(res.jac).max() <= SCIPY_GTOL, res.message
    return res.x


def hessian(objective, theta, x, y, k, l2, eps=1e-6):
    """The objective's Hessian at theta, by central differences of its exact gradient (symmetrised)."""
    h = np.stack([(objective(theta + e, x, y, k, l2)[1] - objective(theta - e, x, y, k, l2)[1]) / (2 * eps)
                  for e in np.eye(len(theta)) * eps])  # fmt: skip
    return (h + h.T) / 2


def check_equal(objective, x, y, k, l2, fit, null):
    """Our fit == scipy's, compared where the problem is well conditioned: in the centred parameters (W, c = b + W m,
    m the features' mean; the same model), whose gradient is the one our L-BFGS stops on. For a strongly convex f
    (curvature >= mu off its null directions) ||t - t*|| <= ||grad f(t)|| / mu, so two points each within their
    gradient tolerance lie within the sum of the two bounds. scipy's tolerance binds the raw gradient, which the chain
    rule turns into at most gtol * (1 + ||m||_1) in the centred one. Returns (the reference (W, b), the bound)."""
    x64, c = x.double().numpy(), x.shape[1]
    m = x64.mean(0)
    xc = x64 - m

    def centred(t):  # (W, b) -> (W, b + W m), the null direction (a shift shared by the biases) projected out
        w, b = t[: k * c].reshape(k, c), t[k * c :] + t[: k * c].reshape(k, c) @ m
        return np.concatenate([w.ravel(), b - b.mean() if null else b])

    ours = np.concatenate([fit.weight.numpy().ravel(), fit.bias.numpy()])
    ref = reference(objective, x64, y, k, l2)
    ref_tol = SCIPY_GTOL * (1 + np.abs(m).sum())
    assert fit.converged and np.abs(objective(centred(ours), xc, y, k, l2)[1]).max() <= GRAD_TOL
    assert np.abs(objective(centred(ref), xc, y, k, l2)[1]).max() <= ref_tol
    eig = np.linalg.eigvalsh(hessian(objective, centred(ref), xc, y, k, l2))
    assert np.abs(eig[:null]).max(initial=0) < 1e-6  # softmax: only the shared shift of the biases is free
    mu = eig[null]
    bound = 2 * np.sqrt(len(ours)) * (GRAD_TOL + ref_tol) / mu  # 2x: the curvature between the points may differ
    assert bound < 1e-3  # a bound with teeth: the weights are O(1)
    assert np.linalg.norm(centred(ours) - centred(ref)) <= bound
    return ref, bound


def test_converged_probe_equals_scipy_logistic_regression_on_tiny_bert_features(env):
    x, y = features(env, env["train"])
    l2 = 1.0 / len(x)
    fit = fit_linear(x, y, 2, "single_label", l2)
    ref, bound = check_equal(softmax_objective, x, y.numpy(), 2, l2, fit, null=1)
    # predictions on the validation features: a logit margin moves by at most 2 * bound * ||[x - m, 1]||
    xv, _ = features(env, env["val"])
    xv64, c = xv.double().numpy(), x.shape[1]
    z_ours = xv64 @ fit.weight.numpy().T + fit.bias.numpy()
    z_ref = xv64 @ ref[: 2 * c].reshape(2, c).T + ref[2 * c :]
    margin = (z_ref[:, 1] - z_ref[:, 0]) - (z_ours[:, 1] - z_ours[:, 0])
    reach = np.sqrt(((xv64 - x.double().numpy().mean(0)) ** 2).sum(1) + 1).max()
    assert np.abs(margin).max() <= 2 * bound * reach
    assert (z_ours.argmax(1) == z_ref.argmax(1)).all()


def test_multi_label_fit_equals_the_bce_reference():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(61, 7, generator=g) * 2 + 0.5  # off-centre features: the centring must not change the optimum
    y = (torch.randn(61, 3, generator=g) + x[:, :3] > 0).to(F64)
    fit = fit_linear(x, y, 3, "multi_label", 0.05)
    check_equal(bce_objective, x, y.numpy(), 3, 0.05, fit, null=0)


# --------------------------------------------------------------------------------------------- end to end
def finetune_args(env, out, *extra):
    return ["finetune", "--from", env["bert"], "--train", env["train"], "--val", env["val"], "--out", out,
            "--batch-size", 8, "--max-length", 32, "--method", "linear-probe", "--pooling", "mean", "--device", "cpu",
            *extra]  # fmt: skip


def test_finetune_linear_probe_reports_the_converged_fit_in_a_normal_run(env, tmp_path, capsys):
    out = tmp_path / "probe"
    code, _, err = run(finetune_args(env, out), capsys)
    assert code == 0, err
    assert "fitted to convergence" in err
    r = json.loads((out / "results.json").read_text())
    p = r["probe"]
    assert p["fit"] == "lbfgs" and p["converged"] and p["grad_max"] <= p["grad_tol"] == GRAD_TOL
    x, y = features(env, env["train"])
    l2 = float((x.double() ** 2).sum(1).mean()) / 48  # the default: the mean squared feature norm / N
    assert p["examples"] == r["n_train"] == 48 and p["l2"] == pytest.approx(l2) and p["iterations"] > 1
    assert r["status"] == "completed" and r["step"] == r["steps"] == 1 and r["best_step"] == 1
    assert r["trainable_params"] == 32 * 2 + 2 and r["warnings"] == []
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["split"]) for x in rows] == [(1, "train"), (1, "val")]
    assert rows[0]["loss"] == pytest.approx(p["train_loss"]) and r["metrics"]["accuracy"] == rows[1]["accuracy"]
    # the saved head is the fit on the same features (float32 storage), the backbone untouched
    fit = fit_linear(x, y, 2, "single_label", l2)
    saved = checkpoint.load(out).model
    torch.testing.assert_close(saved["head.classifier.weight"].double(), fit.weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(saved["head.classifier.bias"].double(), fit.bias, atol=1e-6, rtol=1e-6)
    # 48 training examples computed once by the fit, 24 validation ones by the evaluation
    assert r["feature_cache"] == {"examples": 72, "misses": 72, "hits": 0}
    code, o, err = run(["predict", out, "--input", env["val"]], capsys)
    assert code == 0 and len(o.splitlines()) == 24, err
    code, _, err = run(["export", out, "--to", tmp_path / "hf"], capsys)
    assert code == 0 and (tmp_path / "hf" / "config.json").is_file(), err


def test_probe_epochs_and_steps_step_the_head_as_before(env, tmp_path, capsys):
    code, _, err = run(finetune_args(env, tmp_path / "epochs", "--probe-epochs", 2), capsys)
    assert code == 0 and "--probe-epochs 2 asks for epochs of AdamW steps" in err, err
    r = json.loads((tmp_path / "epochs" / "results.json").read_text())
    per_epoch = LabeledBatcher([{}] * 48, 8, 0).steps_per_epoch
    assert r["steps"] == 2 * per_epoch and r["probe"]["fit"] == "steps"
    code, _, err = run(finetune_args(env, tmp_path / "steps", "--probe-epochs", 2, "--steps", 3), capsys)
    assert code == 0 and "--steps asks for" in err, err
    assert json.loads((tmp_path / "steps" / "results.json").read_text())["steps"] == 3
    for bad, said in ((["--probe-epochs", 0], "--probe-epochs must be at least 1"),
                      (["--probe-l2", -1], "--probe-l2 must be a number >= 0")):  # fmt: skip
        code, _, err = run(finetune_args(env, tmp_path / "bad", *bad), capsys)
        assert code == 2 and said in err and "Traceback" not in err, err
