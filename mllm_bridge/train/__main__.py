"""`python -m mllm_bridge.train pretrain|finetune ...`: see `mllm_bridge.train.cli`."""

from .cli import main

raise SystemExit(main())
