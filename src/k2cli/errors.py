"""One exception type for every mistake a user can fix.

A `K2Error` carries a message that names the problem and, where we know it, the fix.
The CLI prints it as one line and exits with status 2 (the same status click uses for
usage errors), never with a traceback. Library code raises it; only `cli.py` catches it.
"""

from __future__ import annotations


class K2Error(Exception):
    """A problem with the user's input, data, artifacts or environment."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class Interrupted(K2Error):
    """The user stopped a run (SIGINT/SIGTERM) after its state was saved: not a failure of input."""

    exit_code = 130


def closest(name: str, choices) -> str | None:
    """The valid choice that looks most like `name`, for 'did you mean' hints."""
    import difflib

    found = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return found[0] if found else None


def did_you_mean(name: str, choices) -> str:
    """A hint sentence: the closest valid choice, or the full list when none is close."""
    choices = sorted(choices)
    best = closest(name, choices)
    if best:
        return f"did you mean '{best}'?"
    return "valid: " + ", ".join(choices)
