"""`python tests/helpers/stop_after_steps.py STEPS MODULE ARGS...`: run `python -m MODULE ARGS` and end every
process as a kill would once STEPS optimizer steps are done (no cleanup, no final output), for the tests that
resume a multi-process run. Runs under any launcher (accelerate launch, torchrun) as the training script."""

import os
import runpy
import sys

from encoder.training.loop import TrainingLoop

args = sys.argv[1:]
rank = [args.pop(0)] if args[0].startswith("--local_rank=") else []  # put there by the deepspeed launcher
steps, module = int(args[0]), args[1]
real = TrainingLoop._optimizer_step


def killed(self, batches):
    if self.step == steps:
        sys.stdout.flush()
        os._exit(9)
    return real(self, batches)


TrainingLoop._optimizer_step = killed
sys.argv = [module, *rank, *args[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
