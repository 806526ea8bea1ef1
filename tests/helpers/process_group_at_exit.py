"""`python tests/helpers/process_group_at_exit.py MODULE ARGS...`: run `python -m MODULE ARGS` under a launcher and,
once the interpreter starts to exit, print on stdout whether this rank still holds a process group then, for the
test that ranks leave it before the interpreter's finalization (where gloo's threads can abort the process)."""

import atexit
import os
import runpy
import sys

import torch.distributed as dist


@atexit.register
def report():
    print(f"rank {os.environ.get('RANK')}: process group at exit: {dist.is_initialized()}", flush=True)


module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
