"""The one exception type for mistakes in the user's input."""


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""
