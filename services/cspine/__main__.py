"""Allows `python -m cspine`."""

from cspine.cli import main

raise SystemExit(main())
