"""libFuzzer (atheris) harness for the policy loader; run by test_rel_policy.py in a child.

Usage: ``python _atheris_policy.py CORPUS_DIR [libFuzzer flags]``. Any exception
other than :class:`~policy.errors.PolicyError` (and a failure to render one)
is a crash; libFuzzer's ``-timeout`` turns a hang into one too. Inputs that
are not UTF-8 stop at the loader's encoding check (tested on their own), so
they are skipped here to spend the time in the parser and checker.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["policy", "lark"]):
    from policy.compile import load_text
    from policy.errors import PolicyError


def one_input(data: bytes) -> None:
    """Load ``data`` as a policy file: PolicyError is the only acceptable failure."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    try:
        load_text(text, "fuzz.spend")
    except PolicyError as exc:
        exc.render()


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
