"""`python -m upcycle COMMAND ...`: see `upcycle.cli`."""

from encoder.utils.cli import exit_program

from .cli import main

exit_program(main())
