"""Load and check a policy set: files and includes to one immutable :class:`Policy`.

Every check runs and every problem is collected (up to a limit) before
anything is returned, so ``spendkeeper check`` lists them all at once. Nothing
here does I/O beyond reading the policy files themselves.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from policy import syntax as s
from policy._checks import Checker
from policy.errors import Diagnostic, Loc, PolicyError
from policy.model import Policy
from policy.parse import MAX_FILE_BYTES, parse_text, source_lines

__all__ = ["MAX_INCLUDE_DEPTH", "load", "load_text", "policy_files"]

MAX_INCLUDE_DEPTH = 16
MAX_ERRORS = 100


def policy_files(paths: Iterable[str | Path]) -> list[Path]:
    """The ``.spend`` files named by ``paths`` (directories are walked, sorted)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*.spend") if p.is_file()))
        else:
            found.append(path)
    return found


def load(paths: str | Path | Sequence[str | Path], root: str | Path | None = None) -> Policy:
    """Load, check and compile the policy files at ``paths``.

    ``root`` bounds includes (default: the directory given, or the directory of
    the first file). Raises :class:`PolicyError` listing every problem found.
    """
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    if not items:
        raise PolicyError([Diagnostic("no-files", "no policy files given", Loc("<args>"))])
    first = Path(items[0])
    root_dir = Path(root) if root is not None else (first if first.is_dir() else first.parent)
    files = policy_files(items)
    if not files:
        raise PolicyError([Diagnostic("no-files", f"no .spend files in {first}", Loc(str(first)))])
    loader = _Loader(root_dir.resolve())
    for file in files:
        loader.load_file(file, Loc(str(file)), ())
    return loader.finish()


def load_text(text: str, path: str = "<string>") -> Policy:
    """Compile a single policy given as text (includes are not allowed)."""
    loader = _Loader(None)
    loader.add_source(path, text, ())
    return loader.finish()


class _Loader:
    """Reads files, follows includes, then hands every tree to the checker."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.diagnostics: list[Diagnostic] = []
        self.trees: list[s.FileNode] = []
        self.sources: dict[str, str] = {}
        self._split: dict[str, list[str]] = {}  # source lines per file, split once
        self.seen: set[Path] = set()

    def error(self, code: str, message: str, loc: Loc, notes: tuple[str, ...] = ()) -> None:
        self.diagnostics.append(Diagnostic(code, message, loc, self._line(loc), notes))

    def _line(self, loc: Loc) -> str | None:
        if loc.line <= 0:
            return None
        lines = self._split.get(loc.file)
        if lines is None:
            text = self.sources.get(loc.file)
            if text is None:
                return None
            lines = self._split[loc.file] = source_lines(text)
        return lines[loc.line - 1] if loc.line <= len(lines) else None

    def _display(self, path: Path) -> str:
        return os.path.relpath(path) if path.is_absolute() else str(path)

    def load_file(self, path: Path, where: Loc, stack: tuple[Path, ...]) -> None:
        resolved = path.resolve()
        if resolved in stack:
            chain = " -> ".join(self._display(p) for p in (*stack, resolved))
            self.error("include-cycle", f"include cycle: {chain}", where)
            return
        if resolved in self.seen:
            return
        if len(stack) > MAX_INCLUDE_DEPTH:
            self.error("include-depth", f"includes nest deeper than {MAX_INCLUDE_DEPTH}", where)
            return
        self.seen.add(resolved)
        display = self._display(path)
        try:
            info = path.stat()
        except OSError as exc:
            self.error("read", f"cannot read {display}: {exc.strerror}", where)
            return
        if info.st_mode & stat.S_IWOTH:
            self.error("insecure-file", f"{display} is world-writable; refusing to load it "
                       f"(chmod o-w {display})", where)
            return
        if info.st_size > MAX_FILE_BYTES:
            self.error("file-too-large", f"{display} is {info.st_size:,} bytes; the limit is "
                       f"{MAX_FILE_BYTES:,}", where)
            return
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raw = path.read_bytes()[: exc.start]
            line = raw.count(b"\n") + 1
            column = exc.start - (raw.rfind(b"\n") + 1) + 1
            self.error("encoding", f"{display} is not valid UTF-8 (byte {exc.start}: "
                       f"0x{exc.object[exc.start]:02x})", Loc(display, line, column))
            return
        except OSError as exc:
            self.error("read", f"cannot read {display}: {exc.strerror}", where)
            return
        self.add_source(display, text, (*stack, resolved), path)

    def add_source(self, display: str, text: str, stack: tuple[Path, ...],
                   path: Path | None = None) -> None:
        self.sources[display] = text
        try:
            tree = parse_text(text, display)
        except PolicyError as exc:
            self.diagnostics.extend(exc.diagnostics)
            return
        self.trees.append(tree)
        for stmt in tree.body:
            if isinstance(stmt, s.Include):
                self._include(stmt, path, stack)

    def _include(self, stmt: s.Include, path: Path | None, stack: tuple[Path, ...]) -> None:
        if path is None or self.root is None:
            self.error("include", "includes need a policy file on disk", stmt.loc)
            return
        target = (path.parent / stmt.path).resolve()
        if not target.is_relative_to(self.root):
            self.error("include-escape", f'include "{stmt.path}" leaves the policy directory '
                       f"{self._display(self.root)}", stmt.loc)
            return
        if not target.is_file():
            self.error("include-missing", f'included file "{stmt.path}" does not exist', stmt.loc)
            return
        self.load_file(target, stmt.loc, stack)

    def finish(self) -> Policy:
        if not self.diagnostics:
            checker = Checker(self.trees, self._line)
            policy = checker.compile(self._version())
            self.diagnostics.extend(checker.diagnostics)
            if not self.diagnostics:
                return policy
        raise PolicyError(self.diagnostics[:MAX_ERRORS])

    def _version(self) -> str:
        digest = hashlib.sha256()
        for name in sorted(self.sources):
            digest.update(name.encode() + b"\0" + self.sources[name].encode() + b"\0")
        return digest.hexdigest()[:16]


def zone(name: str) -> ZoneInfo | None:
    """The time zone called ``name``, or None if there is none."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None
