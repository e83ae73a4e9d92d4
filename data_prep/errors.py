"""The error type of data preparation: bad input reported without a traceback."""

from __future__ import annotations


class DataPrepError(ValueError):
    """Bad source files, a bad partition spec or an unsafe output folder; the message says which."""
