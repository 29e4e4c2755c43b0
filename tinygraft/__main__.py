"""`tinygraft ...` and `python -m tinygraft ...`: the command line lives in tinygraft/cli/.

The command line's imports (torch, a second or two) run inside `main` with Ctrl-C held back: an interrupt there
would break a C extension's import half-way (numpy then refuses to load again, with a traceback). One that arrives
is answered when the imports are done, like one during a command: "interrupted", exit 130.
"""

import signal
import sys
import threading

INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    held = threading.current_thread() is threading.main_thread()  # only the main thread may set a handler
    interrupts = []
    previous = signal.signal(signal.SIGINT, lambda *_: interrupts.append(1)) if held else None
    try:
        from tinygraft.cli.main import main as run  # noqa: PLC0415 (the point: after the handler is in place)
    finally:
        if held:
            signal.signal(signal.SIGINT, previous)
    if interrupts:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
