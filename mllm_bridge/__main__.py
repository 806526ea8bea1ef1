"""`python -m mllm_bridge COMMAND ...`: see `mllm_bridge.cli`."""

from .cli import main

raise SystemExit(main())
