"""`python tests/helpers/kill_in_final_write.py MODULE ARGS...`: run `python -m MODULE ARGS` and end the process as a
kill would (no cleanup) once the final output is complete in its temporary folder but not yet moved into place,
for the test that resumes a LLaVA run killed while writing its output."""

import os
import runpy
import sys

from mllm_bridge.train import outputs

real = outputs.make_readable


def killed(folder):
    real(folder)
    sys.stdout.flush()
    os._exit(9)


outputs.make_readable = killed
module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
