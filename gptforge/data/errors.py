"""The data pipeline's errors: each is a problem the user can fix, and its message says how.

The command line (cli.py) prints them as one line and exits with 2; training stops on them
before it starts (or, for a token id damaged after its dataset was checked, at the batch that
reads it).
"""

from __future__ import annotations


class DataError(RuntimeError):
    """Preparing or loading data failed for a reason the user can fix; the message says how."""


class CorpusError(DataError):
    """A corpus cannot be prepared or read as asked; the message says why and what to do (a
    DataError, so that training reports it as one line like any other)."""


class BadDocumentError(CorpusError):
    """A bad document under --on_bad=stop (the command line exits with status 2)."""
