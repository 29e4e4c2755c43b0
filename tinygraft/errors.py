"""The one exception users see.

A `TinygraftError` carries one sentence that names the problem and, where there is one, what to do about it.
The CLI prints it without a traceback and exits with code 2; any other exception is a bug and keeps its traceback.
"""


class TinygraftError(Exception):
    """Bad input or a state the user can fix: missing file, shape or vocab mismatch, corrupt checkpoint, NaN loss."""

    exit_code = 2
