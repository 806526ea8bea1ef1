"""`python -m encoder COMMAND ...`: see `encoder.cli`."""

from .cli import main

raise SystemExit(main())
