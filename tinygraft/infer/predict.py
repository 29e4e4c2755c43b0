"""`tinygraft predict RUN`: a fine-tuned run's predictions on a file or stdin, one JSON object per input.

What each task prints, and the inputs it reads, is the task's own (tinygraft/tasks/): classify {"text", "label",
"probabilities"}, tokens {"words", "tags"}, qa {"question", "answer"}, similarity {"text", "text_pair", "score"},
instruct {"prompt", "completion"}.

A file is read the way `--train` reads it whenever it has that shape (tokens: CoNLL columns whose last column holds
the run's tags, or JSONL token lists; qa: SQuAD JSON; the table tasks: TSV / CSV / JSONL with the run's columns);
otherwise, as plain text and stdin, one example per line (the two texts of a pair separated by a tab).
`--input-format conll|jsonl|table|text|squad` forces a reading, and the reading chosen is named on stderr, so
nothing is misread silently. The model is rebuilt from the checkpoint alone (train/runs.py); an adapter run reads
its base again from the path or name it records.
"""

import json
import sys
from pathlib import Path

from tinygraft.core import checkpoint
from tinygraft.errors import TinygraftError
from tinygraft.tasks import get_task
from tinygraft.tasks.base import READINGS
from tinygraft.train import runs


def reading(loaded: runs.Loaded, source: str | None, fmt: str | None) -> str:
    """The input format to read `source` with: `fmt` when given (one the task reads), else the task's guess."""
    ft = loaded.finetune
    task = get_task(ft.task)
    if fmt is not None:
        if fmt not in task.input_formats:
            raise TinygraftError(
                f"--input-format {fmt} is not a reading of the {task.name} task (it reads: "
                f"{', '.join(task.input_formats)})"
            )
        return fmt
    return task.predict_format(source, ft.data, loaded.label_map)


def predict(
    loaded: runs.Loaded, source: str | None, fmt: str | None = None, batch_size: int = 64, max_new_tokens: int = 64
) -> list[dict]:
    if loaded.kind != "finetune":
        raise TinygraftError(f"'{loaded.path}' is not a fine-tuned run (its config has no fine-tuning task)")
    ft = loaded.finetune
    task = get_task(ft.task)
    fmt = reading(loaded, source, fmt)
    name = "stdin" if source in (None, "-") else repr(str(source))
    print(f"reading {name} as {READINGS.get(fmt, fmt)}", file=sys.stderr, flush=True)
    examples = task.read_predict(source, fmt, ft.data, ft.task_settings)
    return task.predict(
        loaded.model,
        loaded.tokenizer,
        examples,
        ft.data,
        ft.task_settings,
        loaded.label_map,
        batch_size,
        max_new_tokens,
    )


def write_rows(rows: list[dict], output: str | None, overwrite: bool) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if output in (None, "-"):
        sys.stdout.write(text)
        return
    out = Path(output)
    if out.exists() and not overwrite:
        raise TinygraftError(f"output '{out}' already exists; pass --overwrite to replace it")
    checkpoint.atomic_write(out, text)
    print(f"wrote {len(rows)} predictions to {out}", file=sys.stderr)
