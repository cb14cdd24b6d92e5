"""User-facing errors: bad input a user can fix. The message says what was wrong, which file or
field, and what was expected; the CLI prints it as one line and exits 2 (flowtok_fast/cli.py),
FLOWTOK_DEBUG=1 shows the traceback. A ValueError so that callers catching ValueError still do."""
from __future__ import annotations


class UserError(ValueError):
    """Raise where the file or field is known, with the expected value in the message."""


class FlowTokWarning(UserWarning):
    """Something the user should know that is not an error (e.g. a prompt truncated to 77
    tokens). The CLI prints it as one line `flowtok-fast <verb>: warning: <message>`."""
