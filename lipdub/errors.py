"""The one exception type for everything a user can cause.

The CLI turns a LipdubError into a single line on stderr and exit code 2; any other
exception is a bug and keeps its traceback.
"""


class LipdubError(Exception):
    """A problem with the user's input, files or environment, with a message fit for one line."""
