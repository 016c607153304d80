"""Shared pytest setup: the hypothesis profile every test run uses."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import settings
from hypothesis.database import DirectoryBasedExampleDatabase

# deadline=None: timing belongs to bench/, and a loaded 2-core CI machine would
# turn slow examples into flaky failures. The database keeps failing examples
# in .hypothesis/ (git-ignored) so a failure replays first on the next run.
settings.register_profile(
    "ci",
    deadline=None,
    database=DirectoryBasedExampleDatabase(
        Path(__file__).resolve().parent.parent / ".hypothesis" / "examples"
    ),
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
