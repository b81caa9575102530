"""The `cspine` command: builds the parser from the command modules (cspine/commands/, one per family), sets up
logging, runs the chosen command and prints its errors.

The environment is read here, once: ``Settings.from_env`` gives every flag its default (a flag given overrides
its ``CSPINE_*`` variable); the library modules never read the environment themselves. docs/configuration.md
lists the variables.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from cspine.commands import (
    analyze,
    bench,
    cohort,
    demo,
    evaluate,
    fuzz,
    inspect,
    k8s,
    loadtest,
    models,
    phantom,
    serve,
    support,
    train,
)
from cspine.config import Settings
from cspine.errors import CspineError

# In the order `cspine --help` lists them.
COMMANDS = (
    phantom,
    inspect,
    cohort,
    bench,
    train,
    models,
    evaluate,
    analyze,
    support,
    serve,
    k8s,
    loadtest,
    fuzz,
    demo,
)


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cspine",
        description="Few-shot, multi-modal cervical spine tumor assistant. Phantom data is SYNTHETIC.",
    )
    parser.add_argument(
        "--log-level",
        default=settings.log_level,
        help="logging level (env CSPINE_LOG_LEVEL, default WARNING)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub, settings)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        settings = Settings.from_env(os.environ)
    except ValueError as exc:
        print(f"cspine: error: {exc}", file=sys.stderr)
        return 2
    args = build_parser(settings).parse_args(argv)
    from cspine.gateway import logs

    # Every command logs redacted, with pydicom's and highdicom's warnings in the log (``serve`` then switches to
    # JSON lines). Like basicConfig, it leaves a host that configured logging itself (a test runner) alone.
    if not logging.getLogger().handlers:
        logs.configure(args.log_level, json_lines=False)
    try:
        return args.func(args)
    except (CspineError, ValueError) as exc:
        print(f"cspine: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cspine: interrupted", file=sys.stderr)
        return 130
