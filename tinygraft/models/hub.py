"""Hugging Face hub cache entries as model directories: read where `huggingface_hub` put them, never downloaded.

The hub client keeps one entry per repository (huggingface_hub's file_download.py lays it out; it is not ours):

    <cache>/models--ORG--NAME/refs/main                  a text file: the commit hash `main` points at
    <cache>/models--ORG--NAME/snapshots/<hash>/<file>    symlinks to ../../blobs/<sha>, one per file of that commit
    <cache>/models--ORG--NAME/blobs/<sha>                the bytes

An entry is named by its path or as `hf:ORG/NAME` (`hf:NAME` for the old un-namespaced ids like `gpt2`), looked up
under $HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub (~/.cache/...): the order the hub
client itself uses. A revision is a branch or tag under refs/ or a commit hash naming a snapshot; `hf:ORG/NAME@REV`
carries one in the spec itself, which is how `--revision` reaches everything downstream as one string. A bare
`ORG/NAME` stays a path: `runs/tiny` must never turn into a hub id.

A run records an entry as `hf:ORG/NAME@<commit hash>` (see `recorded`): the cache moves between machines and
users, as the shipped MiniLM's site-packages path does, and the hash pins the weights even when `main` moves on.
"""

import os
from pathlib import Path

from tinygraft.errors import TinygraftError

PREFIX = "hf:"
ENTRY = "models--"
SEPARATOR = "--"  # the hub forbids "--" inside a repository name, so the folder name maps back to one id
DEFAULT_REVISION = "main"


def cache_dir() -> Path:
    """Where the hub client keeps its entries on this machine (it need not exist)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def is_spec(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def is_entry(path) -> bool:
    """A `models--ORG--NAME` directory of a hub cache (not one of its snapshots, which is a plain model directory)."""
    path = Path(path)
    return path.name.startswith(ENTRY) and (path / "snapshots").is_dir()


def parse(spec: str) -> tuple[str, str | None]:
    """'hf:ORG/NAME@REV' -> ('ORG/NAME', 'REV'); the revision is None when the spec names none."""
    repo, _, revision = spec[len(PREFIX) :].partition("@")
    parts = repo.split("/")
    if not repo or len(parts) > 2 or not all(parts) or any(SEPARATOR in p or p in (".", "..") for p in parts):
        raise TinygraftError(f"{spec!r} is not a hub model id; write hf:ORG/NAME (or hf:NAME), optionally @REVISION")
    if "@" in spec and not revision:
        raise TinygraftError(f"{spec!r} ends in '@' without a revision; write hf:{repo}@BRANCH_TAG_OR_COMMIT")
    return repo, revision or None


def entry_of(repo: str) -> Path:
    return cache_dir() / (ENTRY + repo.replace("/", SEPARATOR))


def snapshot(entry: Path, revision: str | None = None) -> Path:
    """The snapshot directory of `entry` at `revision` (default main): a ref's commit, or a commit hash itself."""
    revision = revision or DEFAULT_REVISION
    if Path(revision).is_absolute() or ".." in Path(revision).parts:
        raise TinygraftError(f"{revision!r} is not a revision name; give a branch, a tag or a commit hash")
    ref, named = entry / "refs" / revision, entry / "snapshots" / revision
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
        found = entry / "snapshots" / commit
        if not commit or not found.is_dir():
            raise TinygraftError(
                f"'{ref}' points at commit {commit!r} but '{found}' does not exist, so the cache entry is "
                "incomplete; download it again"
            )
        return found
    if named.is_dir():
        return named
    raise TinygraftError(
        f"the hub cache entry '{entry}' has no revision {revision!r} (looked for '{ref}' and '{named}')"
    )


def resolve(spec, revision: str | None = None) -> Path | None:
    """The snapshot directory a hub spec or entry names, or None when `spec` is neither (then `revision` must be
    None: a revision of a plain directory means the user meant something else)."""
    if is_spec(spec):
        repo, named = parse(spec)
        if named is not None and revision is not None and named != revision:
            raise TinygraftError(f"{spec!r} names revision {named!r} and --revision names {revision!r}; give one")
        entry = entry_of(repo)
        if not entry.is_dir():
            raise TinygraftError(
                f"no Hugging Face hub cache entry for '{repo}' at '{entry}'; tinygraft reads the cache and never "
                f"downloads, so fetch it first (`huggingface-cli download {repo}`) or point HF_HUB_CACHE at the cache"
            )
        return snapshot(entry, named or revision)
    if spec is not None and is_entry(spec):
        return snapshot(Path(spec), revision)
    if revision is not None:
        raise TinygraftError(
            f"--revision applies to a Hugging Face hub cache entry (hf:ORG/NAME or a models--ORG--NAME directory); "
            f"{str(spec)!r} is neither"
        )
    return None


def with_revision(spec, revision: str) -> str:
    """`spec` with `revision` folded in, as one string every loader reads: 'hf:ORG/NAME@REV', or the snapshot
    directory of an entry given by path."""
    if is_spec(spec):
        repo, named = parse(spec)
        resolve(spec, revision)  # a missing entry or revision is refused here, before any work starts
        return f"{PREFIX}{repo}@{revision}"
    return str(resolve(spec, revision))


def recorded(path: Path) -> str | None:
    """'hf:ORG/NAME@<commit>' when `path` (resolved) is a snapshot of this machine's hub cache, else None."""
    snapshots, entry = path.parent, path.parent.parent
    if snapshots.name != "snapshots" or not entry.name.startswith(ENTRY):
        return None
    try:
        if entry.parent != cache_dir().resolve():
            return None  # another cache: only its path finds it again
    except OSError:
        return None
    return f"{PREFIX}{entry.name[len(ENTRY) :].replace(SEPARATOR, '/')}@{path.name}"
