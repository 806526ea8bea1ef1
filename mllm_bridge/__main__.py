"""`python -m mllm_bridge COMMAND ...`: see `mllm_bridge.cli`."""

from encoder.utils.cli import exit_program

from .cli import main

exit_program(main())
