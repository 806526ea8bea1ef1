"""`python tests/helpers/copy_at_step.py STEPS DEST MODULE ARGS...`: run `python -m MODULE ARGS` to its end, and once
STEPS optimizer steps are done copy the run's output directory, as it stands on disk then, to DEST: what
stop_after_steps.py's kill at that point leaves behind. One launch gives the tests both an uninterrupted run and the
killed state to resume from (the next step waits for the copy: every rank meets the main process in its first
collective). Runs under any launcher (accelerate launch, torchrun, the deepspeed launcher) as the training script."""

import runpy
import shutil
import sys

from encoder.training.loop import TrainingLoop

args = sys.argv[1:]
rank = [args.pop(0)] if args[0].startswith("--local_rank=") else []  # put there by the deepspeed launcher
steps, dest, module = int(args[0]), args[1], args[2]
real = TrainingLoop._optimizer_step


def copied(self, batches):
    if self.step == steps and self.accelerator.is_main_process:
        shutil.copytree(self.checkpoints.root, dest, symlinks=True)
    return real(self, batches)


TrainingLoop._optimizer_step = copied
sys.argv = [module, *rank, *args[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
