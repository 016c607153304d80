"""Diagnostics: the one error type of the policy language.

Every problem found while reading, parsing or checking a policy becomes a
:class:`Diagnostic` with a stable code, a location and a message. They print
as ``file:line:col: code: message`` followed by the source line and a caret,
the way compilers do, so a person can act on them and tests can assert the
exact text.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["Diagnostic", "Loc", "PolicyError", "closest"]

_MAX_SHOWN = 120  # characters of a source line shown under a diagnostic


@dataclass(frozen=True, slots=True)
class Loc:
    """A position in a policy file (1-based line and column)."""

    file: str
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        if self.line <= 0:
            return self.file
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One problem in a policy, with enough context to fix it."""

    code: str
    message: str
    loc: Loc
    source_line: str | None = None
    notes: tuple[str, ...] = field(default=())

    def render(self) -> str:
        """``file:line:col: code: message``, the source line, a caret, notes."""
        out = [f"{self.loc}: {self.code}: {self.message}"]
        if self.source_line is not None and self.loc.line > 0:
            line = self.source_line.rstrip("\n").expandtabs(1)
            caret = max(self.loc.column - 1, 0)
            if len(line) > _MAX_SHOWN:
                # Show a window around the column, not a 100 kB line.
                start = max(caret - _MAX_SHOWN // 2, 0)
                shown = line[start:start + _MAX_SHOWN]
                line = ("..." if start else "") + shown + ("..." if start + _MAX_SHOWN < len(line)
                                                           else "")
                caret = caret - start + (3 if start else 0)
            out.append(f"  {line}")
            out.append("  " + " " * caret + "^")
        out.extend(f"  {note}" for note in self.notes)
        return "\n".join(out)


class PolicyError(Exception):
    """Raised when a policy cannot be loaded; carries every diagnostic found."""

    def __init__(self, diagnostics: Sequence[Diagnostic]) -> None:
        # In file order, so a long list reads top to bottom (stable for ties).
        self.diagnostics = tuple(sorted(diagnostics, key=lambda d: (d.loc.file, d.loc.line,
                                                                    d.loc.column)))
        super().__init__(self.render())

    def render(self) -> str:
        """All diagnostics, one block each, and a count."""
        blocks = [d.render() for d in self.diagnostics]
        n = len(self.diagnostics)
        blocks.append(f"{n} error{'s' if n != 1 else ''}")
        return "\n".join(blocks)


def closest(name: str, known: Iterable[str]) -> str | None:
    """The known name a typo most likely meant, if any is close enough."""
    matches = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return matches[0] if matches else None
