"""One exception type for everything a user can get wrong, so every front end can show it as one line."""


class LorakitError(Exception):
    """A problem with the user's input or environment, worded for the user (names the file or option)."""


def check_option(ok: bool, option: str, problem: str) -> None:
    """Raise ``LorakitError("<option> <problem>")`` unless ``ok``: the one-line shape of every option check."""
    if not ok:
        raise LorakitError(f"{option} {problem}")
