"""The progress bar: step, loss, lr, tokens/s and ETA on a terminal; nothing but the eval lines otherwise."""

import sys

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, initial: int, enabled: bool | None = None):
        # A bar only when stderr is a terminal: logs and CI captures stay readable.
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=not self.enabled)

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        self.bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s", refresh=False)
        self.bar.update(step - self.bar.n)

    def write(self, message: str) -> None:
        if self.enabled:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()
