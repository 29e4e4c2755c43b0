"""`tinygraft ...` and `python -m tinygraft ...`: the command line lives in tinygraft/cli/.

The command line's imports (torch, a second or two) run inside `main` with Ctrl-C held back: an interrupt there
would break a C extension's import half-way (numpy then refuses to load again, with a traceback). One that arrives
is answered when the imports are done, like one during a command: "interrupted", exit 130.
"""

import signal
import sys
import threading

INTERRUPTED = 130


def _hold() -> tuple | None:
    """Ctrl-C recorded instead of raised, from now on; (the handler it replaced, the interrupts seen)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set a handler
        return None
    interrupts: list[int] = []
    return signal.signal(signal.SIGINT, lambda *_: interrupts.append(1)), interrupts


# Held from this module's import on, so an interrupt between the import and `main()` (what a console script runs
# next) is answered too; a later call of main() holds again for itself.
_held = _hold()


def main(argv: list[str] | None = None) -> int:
    global _held
    held, _held = (_held or _hold()), None
    try:
        from tinygraft.cli.main import main as run  # noqa: PLC0415 (the point: after the handler is in place)
    finally:
        if held:
            signal.signal(signal.SIGINT, held[0])
    if held and held[1]:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
