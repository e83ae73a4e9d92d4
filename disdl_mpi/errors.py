"""The library's base error: a problem with the user's input, reported without a traceback."""

from __future__ import annotations


class UserError(RuntimeError):
    """A problem with the user's input or configuration, reported without a traceback.

    ``collective=True`` means every rank raises it at the same point (after an agreement), so
    the job can exit cleanly; otherwise the raising rank aborts the job.
    """

    def __init__(self, message: str, *, collective: bool = False, exit_code: int = 2):
        super().__init__(message)
        self.collective = collective
        self.exit_code = exit_code
