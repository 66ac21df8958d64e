"""Errors a user can fix from the message alone.

Every module raises a subclass of :class:`RetrainError` for bad input (a
missing folder, an unreadable weights file, a bad flag value). The command line
prints the message on stderr and exits with status 2; the library lets it
propagate so a notebook user sees the same message.
"""


class RetrainError(Exception):
    """Bad input or environment; the message names the value and the fix."""
