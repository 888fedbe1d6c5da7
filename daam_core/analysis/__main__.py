"""``python -m daam_core.analysis study|report``: the same commands as ``daam study`` / ``daam report``."""

from .cli import main

raise SystemExit(main())
