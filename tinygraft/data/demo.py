"""The default fine-tuning demo, with no download: which standard-library package does a docstring come from?

Every Python ships the sources of its standard library. We parse (never import) the `.py` files of a fixed list
of packages, take the first paragraph of the docstring of each public function, class and method, and label it
with its top-level package: real sentences written by people, real labels, nothing templated.

    "A coroutine which creates a TCP server bound to host and port."      -> asyncio
    "Call the handlers for the specified record."                          -> logging
    "Unescape &amp;, &lt;, and &gt; in a string of data."                  -> xml

Cleaning: whitespace collapsed, paragraphs under `min_words` words dropped, a text found under two labels dropped
altogether, repeats kept once; each class capped at `max_per_class` texts (those with the smallest sha256, so
the classes stay balanced-ish and the choice is deterministic). Split: a text goes to validation when its sha256
falls in the first `val_fraction` of the hash space, so train and validation never share a text and the split
does not depend on file order. The exact texts follow the running Python's version (3.11: 887 texts, 107 to
160 per class).
"""

from __future__ import annotations

import ast
import csv
import hashlib
import re
import sysconfig
from collections import defaultdict
from pathlib import Path

from tinygraft.errors import TinygraftError

PACKAGES = ("asyncio", "email", "importlib", "logging", "unittest", "xml")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _source_files(package: str, stdlib: Path) -> list[Path]:
    root = stdlib / package
    if root.is_dir():
        return [f for f in sorted(root.rglob("*.py")) if f.name != "__main__.py" and not _is_test(f.relative_to(root))]
    return [stdlib / f"{package}.py"] if (stdlib / f"{package}.py").is_file() else []


def _is_test(rel: Path) -> bool:
    return any(part.startswith("test") for part in rel.parts)


def first_paragraph(doc: str) -> str:
    return " ".join(re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0].split())


def docstrings(path: Path) -> list[str]:
    """First paragraphs of the docstrings of public functions, classes and methods of one source file."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return []
    out = []

    def visit(node: ast.AST):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if child.name.startswith("_"):
                    continue
                doc = ast.get_docstring(child)
                if doc:
                    out.append(first_paragraph(doc))
                if isinstance(child, ast.ClassDef):
                    visit(child)  # its public methods

    visit(tree)
    return out


def build_demo_task(
    packages: tuple[str, ...] = PACKAGES,
    min_words: int = 6,
    max_per_class: int = 160,
    val_fraction: float = 0.2,
    stdlib: str | Path | None = None,
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, val) lists of (text, label)."""
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    labels_of: dict[str, set[str]] = defaultdict(set)
    for package in packages:
        for path in _source_files(package, stdlib):
            for text in docstrings(path):
                if len(text.split()) >= min_words and ">>>" not in text:
                    labels_of[text].add(package)
    by_class: dict[str, list[str]] = defaultdict(list)
    for text, labels in labels_of.items():
        if len(labels) == 1:  # the same sentence under two packages says nothing about either
            by_class[next(iter(labels))].append(text)
    missing = [p for p in packages if len(by_class[p]) < 10]
    if missing:
        raise TinygraftError(
            f"the standard library sources under '{stdlib}' lack docstrings for {', '.join(missing)}; this Python "
            "was installed without its .py sources, so give your own --train/--val files"
        )
    threshold = int(val_fraction * 16**8)
    train, val = [], []
    for package in packages:
        for text in sorted(by_class[package], key=_sha)[:max_per_class]:
            (val if int(_sha(text)[:8], 16) < threshold else train).append((text, package))
    # a stable, mixed order (file order would group the classes)
    return sorted(train, key=lambda r: _sha(r[0])), sorted(val, key=lambda r: _sha(r[0]))


def write_demo_task(out_dir: str | Path, columns: tuple[str, str] = ("text", "label"), **kwargs) -> tuple[Path, Path]:
    """Write train.tsv and val.tsv (`text<TAB>label` with a header, or the `columns` named) into `out_dir`; returns
    their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in zip(("train", "val"), build_demo_task(**kwargs)):
        path = out_dir / f"{name}.tsv"
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")  # quotes a text that starts with a quote
            writer.writerow(list(columns))
            writer.writerows(rows)
        paths.append(path)
    return paths[0], paths[1]


def main(argv=None) -> int:
    """`python -m tinygraft.data.demo --out DIR [--text-col sentence --label-col label]`: the demo as two TSVs, with
    the columns another data set uses (to train it beside that one: `finetune --train docs=DIR/train.tsv ...`)."""
    import argparse  # noqa: PLC0415 (only this entry point parses arguments)

    p = argparse.ArgumentParser(prog="python -m tinygraft.data.demo", description=main.__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--text-col", default="text")
    p.add_argument("--label-col", default="label")
    ns = p.parse_args(argv)
    for path in write_demo_task(ns.out, (ns.text_col, ns.label_col)):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
