"""The wheel carries the grammar: an installed (non-editable) package parses policies."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_installed_wheel_parses_an_example_outside_the_source_tree(tmp_path: Path) -> None:
    """Build the wheel, install it into a fresh venv, load examples/ from a temp copy."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels), str(ROOT)], check=True, cwd=tmp_path)
    [wheel] = wheels.glob("spendkeeper-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # Only what parsing needs: the policy package must not reach into the checkout.
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "--no-deps", str(wheel), "lark", "interegular"], check=True, cwd=tmp_path)
    policies = tmp_path / "policies"
    shutil.copytree(ROOT / "examples", policies, ignore=shutil.ignore_patterns("*.py"))
    script = ("import policy.parse as p, policy.compile as c\n"
              "assert 'site-packages' in p.__file__, p.__file__\n"
              f"pol = c.load({str(policies)!r})\n"
              "print(sorted(pol.orgs), len(pol.rate_tables['anthropic'].canonical))\n")
    out = subprocess.run([str(python), "-c", script], check=True, cwd=tmp_path,
                         capture_output=True, text=True).stdout
    assert out.startswith("['acme', 'globex', 'initech']")
    assert int(out.split()[-1]) >= 20
