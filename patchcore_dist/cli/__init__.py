"""The command line: ``patchcore {fit,score,evaluate,maintain,synthesize,demo,runs}`` and the ``patchcore-<command>``
scripts (the same commands); ``jobs/*.py`` call them for ``ray job submit``."""
from __future__ import annotations

import argparse

from .commands import COMMANDS
from .common import add_config_arguments, config_epilog, run_job


def _command_parser(name: str, parser: argparse.ArgumentParser | None = None, prog: str | None = None):
    add, _, help_ = COMMANDS[name]
    p = parser or argparse.ArgumentParser(prog=prog or f"patchcore-{name}", description=help_,
                                          epilog=config_epilog(name), formatter_class=argparse.RawDescriptionHelpFormatter)
    add(p)
    add_config_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """``patchcore <command> ...``"""
    p = argparse.ArgumentParser(prog="patchcore", description="PatchCore anomaly detection as a batch job on Ray.",
                                epilog="patchcore <command> --help shows each command's arguments and config keys")
    sub = p.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (_, _, help_) in COMMANDS.items():
        _command_parser(name, sub.add_parser(name, help=help_, description=help_, epilog=config_epilog(name),
                                             formatter_class=argparse.RawDescriptionHelpFormatter))
    a = p.parse_args(argv)
    return run_job(COMMANDS[a.command][1], a, a.command)


def run_command(name: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    """One command with its own parser (``patchcore-<name>``, ``python jobs/<name>.py``)."""
    a = _command_parser(name, prog=prog).parse_args(argv)
    return run_job(COMMANDS[name][1], a, name)


def fit_main() -> int:
    return run_command("fit")


def score_main() -> int:
    return run_command("score")


def evaluate_main() -> int:
    return run_command("evaluate")


def maintain_main() -> int:
    return run_command("maintain")


def synthesize_main() -> int:
    return run_command("synthesize")


def demo_main() -> int:
    return run_command("demo")

