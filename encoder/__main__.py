"""`python -m encoder COMMAND ...`: see `encoder.cli`."""

from .cli import main
from .utils.cli import exit_program

exit_program(main())
