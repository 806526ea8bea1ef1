"""`python tests/helpers/process_group_at_exit.py MODULE ARGS...`: run `python -m MODULE ARGS` under a launcher and,
once the interpreter starts to exit, print on stdout whether this rank still holds a process group then and how many
of gloo's threads (its workers and its transport loop) still run, for the test that ranks leave the group, and free
its backend, before the interpreter's finalization (where gloo's threads can abort the process)."""

import atexit
import os
import runpy
import sys
from pathlib import Path

import torch.distributed as dist


def gloo_threads() -> int | str:
    """The threads of this process that gloo started (Linux names them pt_gloo_runloop, gloo_tcp_loop); "unknown"
    without Linux's /proc."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return "unknown"
    names = []
    for task in tasks.iterdir():
        try:
            names.append((task / "comm").read_text())
        except OSError:
            continue  # a thread that ended meanwhile
    return sum("gloo" in name for name in names)


@atexit.register
def report():
    print(f"rank {os.environ.get('RANK')}: process group at exit: {dist.is_initialized()}, gloo threads: "
          f"{gloo_threads()}", flush=True)


module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
