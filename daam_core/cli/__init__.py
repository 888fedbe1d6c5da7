"""The ``daam`` command line: ``daam demo``, ``daam generate``, ``daam analyze``."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
