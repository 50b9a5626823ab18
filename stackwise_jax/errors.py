"""The one exception type for mistakes a user can fix (bad config, missing file)."""


class UserError(Exception):
    """A problem with the user's input. The CLI prints the message, exits 2, no traceback."""
