"""The rule of the command line: a user's mistake is one line on stderr and exit status 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: printed as one clear line, exit status 2."""
