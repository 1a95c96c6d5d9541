"""One exception type for every mistake a user can fix.

The CLI turns a :class:`UserError` into a single line on stderr and exit code 2; anything
else is a bug and exits 1 with a traceback. Keeping the two apart is what lets a script tell
"you typed it wrong" from "kdzoo broke".
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input: the message names the problem and how to fix it."""


def close_matches(name: str, choices: Iterable[str], n: int = 3) -> str:
    """A ' Did you mean: a, b?' suffix, or '' when nothing is close."""
    choices = list(choices)
    matches = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not matches:
        lowered = name.lower()
        matches = [c for c in choices if lowered in c.lower()][:n]
    return f" Did you mean: {', '.join(matches)}?" if matches else ""
