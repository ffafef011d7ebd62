"""Errors that the command line reports as one line, without a traceback."""


class UsageError(ValueError):
    """Bad input from the user: an unknown name, a missing file, a malformed config.

    The message names the bad value and what would be accepted; `fit` prints it as one
    line on stderr and exits with code 2.
    """


class DivergedError(RuntimeError):
    """Training produced a non-finite loss; `fit` exits with code 1 and keeps the last checkpoint."""
