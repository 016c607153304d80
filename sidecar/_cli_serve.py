"""``spendkeeper serve``: run the sidecar (flags, env vars, optional TOML file)."""

from __future__ import annotations

import argparse
import logging
import sys

from sidecar.config import ConfigError, add_serve_arguments, load_config

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The serve flags (see :func:`sidecar.config.add_serve_arguments`)."""
    add_serve_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Load the configuration and serve until SIGTERM/SIGINT."""
    from sidecar.server import serve

    flags = {k.replace("-", "_"): v for k, v in vars(args).items()}
    try:
        config = load_config(flags)
    except ConfigError as exc:
        print(f"spendkeeper serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return serve(config)
    except OSError as exc:
        print(f"spendkeeper serve: {exc}", file=sys.stderr)
        return 1
