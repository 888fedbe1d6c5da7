"""``daam study`` and ``daam report``: the analysis commands, defined in :mod:`daam_core.analysis.cli`."""

from __future__ import annotations

from ..analysis.cli import COMMANDS, add_report_parser, add_study_parser, run_command


def add_parsers(sub) -> None:
    """Add ``study`` and ``report`` to the ``daam`` subcommands."""
    add_study_parser(sub)
    add_report_parser(sub)


__all__ = ["COMMANDS", "add_parsers", "run_command"]
