"""`python -m mllm_bridge.train pretrain|finetune ...`: see `mllm_bridge.train.cli`."""

from encoder.utils.cli import exit_program

from .cli import main

exit_program(main())
