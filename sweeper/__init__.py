"""sweeper: hyperparameter sweeps for memory-augmented few-shot image generators."""

from sweeper.errors import SweeperError

__all__ = ["SweeperError"]
__version__ = "0.1.0"
