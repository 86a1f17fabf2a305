"""One exception type for everything a user can get wrong, so every front end can show it as one line."""


class LorakitError(Exception):
    """A problem with the user's input or environment, worded for the user (names the file or option)."""
