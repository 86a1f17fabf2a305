"""One exception type for everything a user can get wrong, so every front end can show it as one line."""


class LorakitError(Exception):
    """A problem with the user's input or environment, worded for the user (names the file or option)."""


def check_option(ok: bool, option: str, problem: str) -> None:
    """Raise ``LorakitError("<option> <problem>")`` unless ``ok``: the one-line shape of every option check."""
    if not ok:
        raise LorakitError(f"{option} {problem}")


def first_few(names: list[str], shown: int = 3, separator: str = ", ") -> str:
    """The first ``shown`` of ``names`` for a one-line message, with "..." when there are more."""
    return separator.join(names[:shown]) + (f"{separator}..." if len(names) > shown else "")
