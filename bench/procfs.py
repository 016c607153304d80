"""Process inspection through /proc, shared by the benchmarks and the tests.

The sidecar's ``--workers`` mode forks; benchmarks and tests need its worker
pids and their sockets without a dependency such as psutil.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["children_of", "descendants_of", "socket_inodes"]


def children_of(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``, sorted."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # comm may contain spaces and parentheses: the fields after it follow the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return sorted(found)


def descendants_of(pid: int) -> list[int]:
    """Every live process below ``pid`` in the process tree."""
    result: list[int] = []
    todo = [pid]
    while todo:
        kids = children_of(todo.pop())
        result.extend(kids)
        todo.extend(kids)
    return result


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process ``pid`` has open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        match = re.fullmatch(r"socket:\[(\d+)\]", link)
        if match:
            inodes.add(int(match.group(1)))
    return inodes
