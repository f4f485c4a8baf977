"""``python -m lightning_fisher``: the same as the ``lightning-fisher`` command."""

from .cli import main

raise SystemExit(main())
