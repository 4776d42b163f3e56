"""The one exception type for mistakes a user can fix.

The CLI prints ``str(err)`` on one line and exits with status 2; no traceback. A message says
what was wrong, where (file, key, line when known) and what to do about it.
"""


class SweeperError(Exception):
    """A user mistake (bad config, missing data, unreachable service) with a fix in its message."""


class TrainingDiverged(SweeperError):
    """A loss became NaN or infinite; carries the step so trackers can record it."""

    def __init__(self, step: int, losses: dict):
        self.step = step
        self.losses = dict(losses)
        bad = ", ".join(f"{k}={v}" for k, v in losses.items() if v != v or v in (float("inf"), float("-inf")))
        super().__init__(
            f"training diverged at step {step}: non-finite loss ({bad}); "
            "lower train.lr, or check the data and the model config"
        )
