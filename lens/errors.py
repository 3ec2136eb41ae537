"""The one exception type lens raises for bad input: its message names the problem and the fix."""


class LensError(Exception):
    """Bad input or a missing resource.  The CLI prints the message alone, no traceback."""
