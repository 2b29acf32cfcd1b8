"""The one error type of the command line: a user's mistake, reported as one line with exit code 2.

A leaf module (it imports nothing of cbam_dsa), so every subcommand can raise it without importing the parser.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A mistake in the user's options or files: reported as one line, exit code 2."""
