"""Constants and helpers shared by the client tests (imported by name; conftest is not)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
#: The one model of ``policy.spend``: $3 input, $15 output per MTok.
MODEL = "claude-sonnet-4-6"
#: 1000 input tokens at $3/MTok plus 1000 output tokens at $15/MTok.
WORST_1K_1K = Decimal("0.018")


@dataclass
class ChildServer:
    """A sidecar running in a child process."""

    process: subprocess.Popen[str]
    port: int

    @property
    def target(self) -> str:
        """``host:port`` to connect to."""
        return f"127.0.0.1:{self.port}"
