"""Distillation as an objective of the one loop: a student learns from a frozen teacher's outputs and insides.

    tinygraft distill --teacher RUN_OR_DIR (--student PRESET|DIR|RUN | --student-from-teacher 0,2,4) --out DIR ...

A fine-tuned teacher makes it a fine-tuning run (train/finetune.py, the student with the teacher's head), a language
model teacher a pre-training run (train/pretrain.py, on `--data`); either way the run's config carries a `distill`
section (train/config.py: DistillSettings), so resume, `predict`, `export`, `eval` and `info` treat it as the job it
is. The student's loss per batch, under the job's own forward:

    task_weight * the job's loss (labels, next tokens, masked tokens)
  + kd_weight * T^2 * D(teacher / T || student / T)       over classes (cached per example) or the vocabulary
                                                            (kernels/kd_loss.py: chunked, never the whole logits)
  + hidden_weight * sum over --layer-map pairs of MSE or 1 - cos(teacher, W student)   W learned when widths differ
  + attention_weight * MiniLM's last-layer attention and value relations

The teacher runs in eval mode under no_grad (bf16 on CUDA, through the loop's autocast). For tasks with class or
position logits, its outputs are computed once for every training example before the first step, in file order
(so a resumed run finds the very same numbers) and an epoch repeats them; hidden states are recomputed each step.
"""

import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import nn

from tinygraft.core import dist
from tinygraft.data import labeled as L
from tinygraft.errors import TinygraftError
from tinygraft.kernels.kd_loss import kd_loss
from tinygraft.models.bert import BERTForMaskedLM
from tinygraft.models.presets import PRESETS, build_model, family, get_preset
from tinygraft.models.student import parse_layers, student_from_teacher
from tinygraft.tasks.base import say
from tinygraft.train import distill_losses as D
from tinygraft.train import runs
from tinygraft.train.config import DistillSettings
from tinygraft.train.distill_report import examples_per_s, markdown, params_of, write_table
from tinygraft.train.loop import rng_preserved, to_device


@dataclass
class Teacher:
    model: nn.Module  # a TaskModel (fine-tuned teacher) or a GPT / BERTForMaskedLM, eval mode, frozen
    tokenizer: object
    kind: str  # "finetune" | "lm"
    source: str  # as the run records it
    loaded: runs.Loaded


def load_teacher(spec: str) -> Teacher:
    kind, path, _ = runs.locate_spec(spec)
    loaded = runs.load(path, target=None if kind == "finetune" else "lm")
    if kind == "finetune" and loaded.config.get("adapters"):
        raise TinygraftError(f"--teacher '{path}' holds several adapters; distil from a run with one head")
    model = loaded.model.eval().requires_grad_(False)
    if kind != "finetune" and not hasattr(model, "get_output_embeddings"):
        raise TinygraftError(f"--teacher '{path}' has no language-model head to distil from")
    if loaded.tokenizer is None:
        raise TinygraftError(f"--teacher '{path}' has no tokenizer")
    return Teacher(model, loaded.tokenizer, "finetune" if kind == "finetune" else "lm", str(path.resolve()), loaded)


def teacher_kind(spec: str) -> str:
    """'finetune' (a fine-tuned run: distil a task) or 'lm' (anything else: distil the language model)."""
    kind, _, _ = runs.locate_spec(spec)
    return "finetune" if kind == "finetune" else "lm"


def is_preset(spec: str | None) -> bool:
    return spec in PRESETS


def check_tokenizers(teacher_tok, student_tok, where: str) -> None:
    if teacher_tok.vocab_size != student_tok.vocab_size:
        raise TinygraftError(
            f"{where} has a tokenizer of {student_tok.vocab_size} tokens and the teacher one of "
            f"{teacher_tok.vocab_size}; a student must share the teacher's tokenizer"
        )
    if teacher_tok.to_json() != student_tok.to_json():
        raise TinygraftError(f"{where} and the teacher have tokenizers whose token ids differ; they must share one")


def student_layers(settings: DistillSettings) -> list[int] | None:
    text = settings.student_from_teacher
    return None if text in (None, "every-other") else parse_layers(text)


def preset_config(name: str, teacher_model: nn.Module, cfg=None):
    """A preset's sizes (or `cfg`, the preset as the run resolved it) with the teacher's vocabulary, positions and
    layout (a preset names sizes only; a RoBERTa teacher's student numbers positions and pads as it does)."""
    cfg, t_cfg = cfg or get_preset(name), D.core_of(teacher_model).config
    if family(cfg) != family(t_cfg):
        raise TinygraftError(
            f"--student {name} is a {family(cfg).upper()} and the teacher a {family(t_cfg).upper()}; distilling "
            "needs the same family"
        )
    fields = {"vocab_size": t_cfg.vocab_size}
    for key in (
        "block_size",
        "max_position_embeddings",
        "type_vocab_size",
        "pad_token_id",
        "position_offset",
        "hf_model_type",
    ):
        if hasattr(t_cfg, key):
            fields[key] = getattr(t_cfg, key)
    return dataclasses.replace(cfg, **fields)


def task_student(settings: DistillSettings, teacher: Teacher):
    """(backbone, head or None) of a student built from a fine-tuned teacher's blocks or from a preset (head None:
    the task makes a fresh one); a student directory or run is the job's own --from."""
    if settings.student_from_teacher is not None:
        student = student_from_teacher(teacher.model, student_layers(settings)).requires_grad_(True)
        return student.backbone, student.head
    model = build_model(preset_config(settings.student, teacher.model))
    return (model.bert if isinstance(model, BERTForMaskedLM) else model), None


def check_choice(settings: DistillSettings) -> None:
    if (settings.student is None) == (settings.student_from_teacher is None):
        raise TinygraftError("give exactly one of --student PRESET|DIR|RUN and --student-from-teacher LAYERS")


# --------------------------------------------------------------------------------------------------- the losses
class Distiller:
    """The student's loss with the teacher's terms added (the module docstring's formula)."""

    def __init__(self, settings: DistillSettings, teacher: nn.Module, student: nn.Module, base_loss, mode: str):
        self.s, self.teacher, self.base_loss, self.mode = settings, teacher, base_loss, mode
        self.cache: dict | None = None
        fam_t, fam_s = (family(D.core_of(m).config) for m in (teacher, student))
        if fam_t != fam_s and (mode != "task" or settings.attention_weight > 0):
            raise TinygraftError(
                f"the teacher is a {fam_t.upper()} and the student a {fam_s.upper()}; "
                + ("distilling a language model" if mode != "task" else "the attention relations")
                + " needs the same family"
            )
        self.causal = fam_s == "gpt"
        n_t, n_s = D.n_layers(teacher), D.n_layers(student)
        self.pairs = D.parse_layer_map(settings.layer_map, n_t, n_s) if settings.hidden_weight > 0 else []
        w_t, w_s = D.width_of(teacher), D.width_of(student)
        self.aux = nn.ModuleDict()
        pair_head = getattr(getattr(student, "head", None), "pair_inputs", False)
        if pair_head and (self.pairs or settings.attention_weight > 0):
            raise TinygraftError(
                "the hidden-state and attention losses read one text per example; the similarity task encodes two, "
                "so distil it with --kd-weight alone"
            )
        if w_t != w_s and (self.pairs or pair_head):
            if not settings.projection:
                raise TinygraftError(
                    f"the teacher's width is {w_t} and the student's {w_s}; the hidden-state loss needs the learned "
                    "projection (drop --no-projection) or students of the teacher's width"
                )
            self.aux["project"] = nn.Linear(w_s, w_t, bias=False)  # one W for every pair, TinyBERT's W_h
        self.heads = None
        if settings.attention_weight > 0:
            self.heads = D.relation_heads(settings.relation_heads, w_t, w_s, D.core_of(student).config.n_head)
        self.vocab = mode == "lm" or getattr(getattr(student, "head", None), "family", None) == "gpt"
        self.T = settings.temperature_for(self.vocab)
        if self.vocab:
            v_t, v_s = (self._output_layer(m).weight.shape[0] for m in (teacher, student))
            if v_t != v_s:
                raise TinygraftError(
                    f"the teacher scores {v_t} tokens and the student {v_s}; distilling a language model needs "
                    "one vocabulary"
                )

    def _project(self, h):
        return self.aux["project"](h) if "project" in self.aux else h

    @staticmethod
    def _output_layer(model: nn.Module) -> nn.Module:
        model = D.unwrap(model)
        core = getattr(model, "backbone", model)
        return core.get_output_embeddings()

    @staticmethod
    def _head_weight(model: nn.Module) -> torch.Tensor:
        """The output layer's weight, with a masked LM's separate bias as one more column (inputs get a 1)."""
        model = D.unwrap(model)
        w = Distiller._output_layer(model).weight
        if isinstance(model, BERTForMaskedLM):
            w = torch.cat([w, model.cls.predictions.bias[:, None].to(w.dtype)], dim=1)
        return w

    @staticmethod
    def _with_one(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
        if isinstance(D.unwrap(model), BERTForMaskedLM):
            return torch.cat([h, torch.ones_like(h[..., :1])], dim=-1)
        return h

    def _taps(self, model, side: int):
        layers = [p[side] for p in self.pairs]
        final = self._output_layer(model) if self.vocab and self.s.kd_weight > 0 else None
        return D.Tap(model, layers, self.heads is not None, final)

    def _teacher_forward(self, batch):
        self.teacher.to(self._device)
        with torch.no_grad():
            if self.mode == "task":
                return self.teacher(batch)[0]
            if isinstance(batch, (tuple, list)):
                return self.teacher(batch[0])
            return self.teacher(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))

    def __call__(self, model, batch) -> torch.Tensor:
        self._device = next(model.parameters()).device
        with self._taps(model, 1) as tap_s:
            out = self.base_loss(model, batch) if self.mode != "task" else model(batch)
        out_s, task = out if self.mode == "task" else (None, out)
        loss = self.s.task_weight * task if self.s.task_weight > 0 else task * 0.0
        need_teacher = self.pairs or self.heads or (self.s.kd_weight > 0 and (self.vocab or self.cache is None))
        out_t = None
        if need_teacher:
            with self._taps(self.teacher, 0) as tap_t:
                out_t = self._teacher_forward(batch)
        mask = self._masks(batch)[0]
        if self.s.kd_weight > 0:
            loss = loss + self.s.kd_weight * self._soft(
                model, batch, out_s, out_t, tap_s, tap_t if need_teacher else None
            )
        if self.pairs:
            h = sum(D.hidden_loss(tap_t.hidden[t], self._project(tap_s.hidden[s]), mask, self.s.hidden_loss)
                    for t, s in self.pairs)  # fmt: skip
            loss = loss + self.s.hidden_weight * h
        if self.heads:
            loss = loss + self.s.attention_weight * D.relation_loss(tap_t.qkv, tap_s.qkv, self.heads, mask, self.causal)
        return loss

    def _masks(self, batch):
        """(real-token mask or None, per-token labels or None) of a batch of this job."""
        if isinstance(batch, (tuple, list)):
            return None, batch[1]
        return batch.get("attention_mask"), batch.get("labels")

    def _soft(self, model, batch, out_s, out_t, tap_s, tap_t) -> torch.Tensor:
        s = self.s
        if self.vocab:  # the vocabulary-wide term, chunked
            labels = self._masks(batch)[1]
            h_s, h_t = tap_s.final, tap_t.final
            if self.mode == "task":  # instruct: position t predicts token t + 1, labels shifted
                h_s, h_t, labels = h_s[:, :-1], h_t[:, :-1], labels[:, 1:]
            student = (self._with_one(model, h_s), self._head_weight(model))
            teacher = (self._with_one(self.teacher, h_t), self._head_weight(self.teacher))
            return kd_loss(*student, *teacher, labels, self.T, s.divergence, s.jsd_beta)
        if self.cache is not None:
            out_t = self._cached(batch)
        head = D.unwrap(model).head
        return D.output_loss(head, out_s, out_t, batch, self.T, s.divergence, s.jsd_beta,
                             self._project if "project" in self.aux else None)  # fmt: skip

    # ------------------------------------------------------------------------------------------ the teacher cache
    TOKEN_LEVEL = ("start_logits", "end_logits")

    def fill_cache(self, features: list[dict], batch_size: int, pad_id: int, device) -> None:
        """Every training example's teacher outputs, computed once in file order (see the module docstring)."""
        if self.vocab or self.s.kd_weight == 0:
            return
        self._device = device
        self.cache = {}
        per_token = self.TOKEN_LEVEL + (() if hasattr(self.teacher.head, "problem") else ("logits",))
        for batch in L.eval_batches(features, batch_size, pad_id):
            batch = to_device(batch, device)
            out = self._teacher_forward(batch)
            lengths = batch["attention_mask"].sum(-1).tolist() if "attention_mask" in batch else None
            for i, example in enumerate(batch["example"]):
                self.cache[example] = {
                    k: (v[i, : int(lengths[i])] if k in per_token else v[i]).float().cpu()
                    for k, v in out.items()
                    if isinstance(v, torch.Tensor) and v.dim() >= 1
                }

    def _cached(self, batch) -> dict:
        rows = [self.cache[e] for e in batch["example"]]
        device = self._device
        out = {}
        for key in rows[0]:
            values = [r[key] for r in rows]
            if key in self.TOKEN_LEVEL or (key == "logits" and values[0].dim() == 2):
                T = batch["attention_mask"].shape[1]
                padded = torch.zeros((len(values), T, *values[0].shape[1:]))
                for i, v in enumerate(values):
                    padded[i, : v.shape[0]] = v
                out[key] = padded.to(device)
            else:
                out[key] = torch.stack(values).to(device)
        return out


def describe(settings: DistillSettings, distiller: Distiller, teacher: Teacher) -> str:
    s = settings
    parts = [f"teacher {teacher.source}", f"kd {s.kd_weight} ({s.divergence}, T {distiller.T:g})",
             f"task {s.task_weight}"]  # fmt: skip
    if distiller.pairs:
        shown = ",".join(f"{t}:{st}" for t, st in distiller.pairs)
        parts.append(f"hidden {s.hidden_weight} ({s.hidden_loss}, layers {shown})")
    if distiller.heads:
        parts.append(f"attention {s.attention_weight} ({distiller.heads} relation heads)")
    if "project" in distiller.aux:
        parts.append("a learned projection to the teacher's width")
    return "distilling: " + ", ".join(parts)


def attach(job, distiller: Distiller, teacher: Teacher, evaluate, device, before=None) -> None:
    """Make `job` a distillation job: its loss is the distiller's, its aux modules the projections; the teacher's
    own validation metrics (the same evaluation as the student's) go into results.json."""
    say(describe(distiller.s, distiller, teacher))
    teacher.model.to(device).eval()
    if before is not None:
        t0 = time.perf_counter()
        before()
        if distiller.cache is not None:
            say(f"teacher outputs cached for {len(distiller.cache)} examples in {time.perf_counter() - t0:.1f} s")
    with rng_preserved(), torch.no_grad():
        metrics = {k: float(v) for k, v in evaluate(teacher.model).items()}
    say("the teacher's val " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    job.loss_fn = distiller
    job.aux = distiller.aux
    job.extra_results["distill"] = {
        "teacher": teacher.source,
        "teacher_metrics": metrics,
        "teacher_params": params_of(teacher.model),
        "layer_map": [list(p) for p in distiller.pairs],
        "relation_heads": distiller.heads,
        "projection": "project" in distiller.aux,
        **dataclasses.asdict(distiller.s),
    }


def task_report(run_dir, teacher: Teacher, student, val: list[dict], pad_id: int, t, results: dict) -> dict:
    """Inference speed of teacher and student on the validation examples, and the run's distill table."""
    device = next(student.parameters()).device
    speed = {name: examples_per_s(m, val, t.eval_batch_size, pad_id, device)
             for name, m in (("teacher", teacher.model), ("student", student))}  # fmt: skip
    metric = results["metric"]
    info = results["distill"]
    rows = [
        {"model": "teacher", "metric": info["teacher_metrics"].get(metric), "params": info["teacher_params"],
         "examples_per_s": speed["teacher"]},
        {"model": "student", "metric": (results.get("metrics") or {}).get(metric),
         "params": results["total_params"], "examples_per_s": speed["student"]},
    ]  # fmt: skip
    if dist.is_main():
        write_table(run_dir / "distill", rows, metric)
    say("\n" + markdown(rows, metric))
    return {"table": rows}
