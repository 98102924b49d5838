"""The two exceptions every public entry raises for bad input, and the "did you mean" that most of them carry."""

from __future__ import annotations

import difflib
from typing import Iterable


class UserError(ValueError):
    """Bad user input. The CLI prints the message as one line on stderr and exits with code 2."""


class ConfigError(UserError):
    """A config key is unknown, missing or of the wrong type."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
