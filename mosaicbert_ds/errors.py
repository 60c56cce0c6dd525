"""The exception types for what is not a bug: the user's input, and outputs that cannot be written."""


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""

    exit_code = 2


class OutputError(UserError):
    """An output could not be written (no space left, I/O error, read-only file system): printed as
    one line, exit code 5. What was at the destination before is unchanged."""

    exit_code = 5


def first_line(err: BaseException) -> str:
    """An exception as one line, for messages that wrap library errors."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
