"""Errors a user can fix by editing a recipe or a command line.

They carry the recipe file, the full key path, what was given and what is allowed, so the CLI
can print one clear paragraph and exit with code 2 instead of a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

#: Exit code for every recipe or usage error (the same code argparse uses).
USAGE_EXIT_CODE = 2


def close_match(word: str, candidates: Iterable[str]) -> str | None:
    """The most similar candidate, if any is similar enough to be a likely typo."""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RecipeError(Exception):
    """A recipe (or an override of it) that cannot be run as written."""

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        key: str | None = None,
        given: Any = ...,
        allowed: str | Iterable[str] | None = None,
        suggestion: str | None = None,
    ) -> None:
        self.message = message
        self.source = source
        self.key = key
        self.given = given
        self.allowed = allowed if isinstance(allowed, str) or allowed is None else ", ".join(allowed)
        self.suggestion = suggestion
        self.origin: str | None = None
        super().__init__(self.render())

    def with_source(self, source: str, origin: str | None = None) -> RecipeError:
        """Attach the recipe file and, when it differs, where the bad key was set (a fragment,
        the smoke block, the command line); a source already set by the raiser is kept."""
        if self.source is None:
            self.source = source
            self.origin = origin if origin != source else None
            self.args = (self.render(),)
        return self

    def render(self) -> str:
        where = ": ".join(part for part in (self.source, self.key) if part)
        origin = f" (from {self.origin})" if self.origin else ""
        lines = [f"{where}: {self.message}{origin}" if where else self.message + origin]
        if self.given is not ...:
            lines.append(f"  given:   {short_repr(self.given)}")
        if self.allowed:
            lines.append(f"  allowed: {self.allowed}")
        if self.suggestion:
            lines.append(f"  did you mean '{self.suggestion}'?")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()
