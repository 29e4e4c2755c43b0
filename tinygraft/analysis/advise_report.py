"""What `tinygraft advise` prints and writes: the measured table, the recommendation with its reasons, the exact
commands to run next (analysis/advise.py measures, analysis/advice.py decides), and a chart."""

import dataclasses
import shlex
from pathlib import Path

from tinygraft.analysis import advice as A
from tinygraft.train import methods

COMPARE_METHODS = ("zero-shot", "linear-probe", "lora", "full")


def commands(report: dict, shared: list[str], method_flags: dict[str, list[str]], out: Path) -> dict:
    """{'finetune', 'compare', 'pretrain' (only when the text is unlike the model's), 'predict' (when the pick is the
    trial run)}: command lines built from the flags the user gave advise (`shared`: data, task and schedule flags;
    `method_flags`: {method setting: its flags}, each repeated where a method of the command takes it), so they read
    the same data the same way."""
    a = report["advice"]
    source = fit_from = report["source"]
    out_cmds = {}
    if a["pretrain_first"]:
        head = ["--new-head"] if report["domain"]["lm_loss"] is None else []  # (a sentence encoder has no MLM head)
        out_cmds["pretrain"] = _line(["tinygraft", "pretrain", "--from", source, *head, "--data",
                                      str(out / "domain.txt"), "--out", str(out / "domain")])  # fmt: skip
        fit_from = str(out / "domain")
    trains = a["method"] not in ("zero-shot", "linear-probe")
    tail = []
    if trains:  # (zero-shot and the fitted probe take no rate or epochs)
        every = eval_every(a["epochs"], report["steps_per_epoch"])
        tail = ["--lr", f"{a['lr']:g}", "--epochs", str(a["epochs"]), *every]
    own = taken_by(method_flags, [a["method"]])
    finetune = ["tinygraft", "finetune", "--from", fit_from, *shared, *own, "--method", a["method"], *tail]
    out_cmds["finetune"] = _line([*finetune, "--out", f"runs/{a['method']}"])
    trial = report.get("trial")
    if trial and a["method"] == trial["method"] and not a["pretrain_first"]:  # the trial is that very run
        out_cmds["predict"] = _line(["tinygraft", "predict", trial["run"], "--input", "FILE"])
    methods = [m for m in COMPARE_METHODS if m != "zero-shot" or "zero-shot" in report["scores"]]
    compare = ["tinygraft", "compare", "--from", fit_from, *shared, *taken_by(method_flags, methods), "--methods",
               ",".join(methods)]  # fmt: skip
    epochs = ["--epochs", str(a["train_epochs"]), *eval_every(a["train_epochs"], report["steps_per_epoch"])]
    out_cmds["compare"] = _line([*compare, *epochs, "--seeds", "0,1,2", "--out", str(out / "compare")])
    return out_cmds


def taken_by(method_flags: dict[str, list[str]], names: list[str]) -> list[str]:
    own = {f.name for m in names for f in dataclasses.fields(methods.lookup(m)[0].Settings)}
    return [x for name, parts in method_flags.items() if name in own for x in parts]


def eval_every(epochs: int, steps_per_epoch: int) -> list[str]:
    every = A.eval_interval(epochs, steps_per_epoch)
    return [] if every is None else ["--eval-every", str(every)]


def _line(parts: list[str]) -> str:
    return " ".join(shlex.quote(p) for p in parts)


def format_text(report: dict) -> str:
    d, dom, a = report["data"], report["domain"], report["advice"]
    lines = [f"## advise: {report['task']} from {report['source']}", "", "### what was measured", ""]
    lines.append(f"- data: {d['examples']:,} labeled training examples")
    if d.get("per_class"):
        shown = ", ".join(f"{k}: {v:,}" for k, v in list(d["per_class"].items())[:8])
        more = f" (+{len(d['per_class']) - 8} more)" if len(d["per_class"]) > 8 else ""
        lines.append(f"  - per class: {shown}{more}; smallest / largest {d['balance']:.2f}")
    lines.append(
        f"  - tokens per example: median {d['tokens_p50']:.0f}, p95 {d['tokens_p95']:.0f}, max {d['tokens_max']:,}; "
        f"{d['over_max_length']:.1%} longer than --max-length {d['max_length']}, {d['over_positions']:.1%} longer "
        f"than the model's {d['positions']} positions"
    )
    t, r = dom["text"], dom["reference"]
    lines.append(
        f"- domain: {t['pieces_per_word']:.2f} pieces per word, {t['unk_rate']:.2%} unknown tokens; "
        f"{dom['reference_name']}: {r['pieces_per_word']:.2f}, {r['unk_rate']:.2%}"
    )
    if dom["lm_loss"] is not None:
        lines.append(f"  - LM loss: {dom['lm_loss']:.3f} on this text, {dom['reference_lm_loss']:.3f} on the reference")
    else:
        lines.append(f"  - LM loss: {dom['lm_note']}")
    lines.append("  - " + ("unlike the model's text: " + "; ".join(dom["gap"]) if dom["gap"] else "no gap found"))
    for m, v in report["scores"].items():
        trial = report.get("trial") if m == "lora" else None
        note = f" (a trial: {trial['epochs']} epochs, {trial['train_seconds']:.0f} s, {trial['run']})" if trial else ""
        lines.append(f"- {m}: validation {report['metric']} {v:.4f}{note}")
    n = a["train_epochs"]
    span = f"{n} epoch{'s' if n > 1 else ''}; the probe: its fit"
    lines += ["", f"| method | step s | est. training time ({span}) | peak MB | fits the device |"]
    lines.append("|---|---|---|---|---|")
    for m, c in report["costs"].items():
        epochs = 1 if m == "linear-probe" else a["train_epochs"]
        unit = f"per {c.get('unit', 'step')}"
        lines.append(f"| {m} | {c['step_seconds']:.4g} ({unit}) | {A._duration(c['epoch_seconds'] * epochs)} | "
                     f"{c['peak_mb']:,.0f} | {'yes' if c['fits'] else 'no'} |")  # fmt: skip
    lines += ["", f"device: {report['device']['type']}, {report['device']['memory_mb']:,.0f} MB; {report['caps']}"]
    lines += ["", "### recommendation", "", f"**{a['method']}**"]
    if a["method"] not in ("zero-shot", "linear-probe"):
        lines[-1] += f" at lr {a['lr']:g}, {a['epochs']} epoch{'s' if a['epochs'] > 1 else ''}"
    lines += ["", f"- the tree: {a['branch']}"] + [f"- {x}" for x in a["reasons"]]
    th = report["thresholds"]
    lines.append(
        f"- thresholds: prompt below {th['prompt_below']}, probe below {th['features_below']:,}, full from "
        f"{th['full_from']:,} examples (LoRA or full between); text unlike the model's above "
        f"{th['pieces_ratio']}x pieces per word, {th['unk_rate']:.0%} unknown tokens or {th['lm_gap']:g} nats of LM "
        f"loss; epochs for at least {th['min_steps']} steps (at most {th['max_epochs']}); a LoRA trial below "
        f"{th['features_below']:,} examples of at most {th['trial_steps']} steps"
    )
    lines += ["", "### next", ""] + [f"    {c}" for c in report["commands"].values()]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415 (matplotlib loads only when a chart is drawn)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    a = report["advice"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    scores = report["scores"]
    if scores:
        axes[0].bar(list(scores), list(scores.values()), color="tab:blue")
        axes[0].set_ylabel(f"validation {report['metric']}")
        axes[0].set_title("what the model already knows")
    else:
        axes[0].text(0.5, 0.5, "no zero-shot or probe score\n(classify only)", ha="center", va="center")
        axes[0].set_axis_off()
    names = list(report["costs"])
    secs = [c["epoch_seconds"] * (1 if m == "linear-probe" else a["train_epochs"]) for m, c in report["costs"].items()]
    colors = ["tab:green" if m == a["method"] else "tab:gray" for m in names]
    axes[1].bar(names, secs, color=colors)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("estimated training seconds (log)")
    axes[1].set_title(f"cost here; recommended: {a['method']}")
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"advise: {report['task']} from {report['source']}, {report['data']['examples']:,} examples")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
