"""tinygraft: a from-scratch transformer training engine for the whole transfer-learning path.

Importing tinygraft never imports Triton (or transformers): the Triton paths import it when they first run.
"""

__version__ = "0.1.0"

from tinygraft.core.errors import TinygraftError  # noqa: E402

__all__ = ["TinygraftError", "__version__"]
