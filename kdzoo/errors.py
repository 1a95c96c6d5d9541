"""One exception type for every mistake a user can fix.

The CLI turns a :class:`UserError` into a single line on stderr and exit code 2; anything
else is a bug and exits 1 with a traceback. Keeping the two apart is what lets a script tell
"you typed it wrong" from "kdzoo broke".
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path


class UserError(Exception):
    """Bad input: the message names the problem and how to fix it."""


def missing(what: str, path: str | Path, expected: str = "file") -> str:
    """``"<what> '<path>' does not exist"``, or what is there instead: a folder given where a
    file belongs (or a file for a folder) is not missing, and saying so would send the user
    looking for the wrong mistake."""
    path = Path(path)
    if path.is_dir():
        return f"{what} {str(path)!r} is a folder, not a {expected}"
    if path.exists():
        return f"{what} {str(path)!r} is a file, not a {expected}"
    return f"{what} {str(path)!r} does not exist"


def close_matches(name: str, choices: Iterable[str], n: int = 3) -> str:
    """A ' Did you mean: a, b?' suffix, or '' when nothing is close."""
    choices = list(choices)
    matches = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not matches:
        lowered = name.lower()
        matches = [c for c in choices if lowered in c.lower()][:n]
    return f" Did you mean: {', '.join(matches)}?" if matches else ""
