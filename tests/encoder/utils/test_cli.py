"""How a command ends: exit_program gives the command's status, also for a failed rank still in a process group."""

from __future__ import annotations

import subprocess
import sys

import pytest

from encoder.utils.cli import exit_program

# A failed command in a gloo process group (its threads alive, as on a rank whose launch stopped on an error), with
# an exit handler standing for the interpreter's finalization, which exit_program must skip there (the group's
# threads would run on into it) and must not skip without a group.
COMMAND = """
import atexit, os, sys, tempfile
import torch.distributed as dist
from encoder.utils.cli import exit_program
if sys.argv[1] == "group":
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1), rank=0,
                            world_size=1)
atexit.register(lambda: print("finalization ran", file=sys.stderr))
print("error: the line the command printed", file=sys.stderr)
exit_program(int(sys.argv[2]))
"""


def run_command(group: str, code: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", COMMAND, group, str(code)], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.end_to_end
def test_a_failed_rank_in_a_process_group_ends_with_its_status_and_line_before_finalization():
    failed = run_command("group", 2)
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert failed.stderr.strip().splitlines() == ["error: the line the command printed"]
    # a failure outside a group, like a success anywhere, ends normally (finalization, exit handlers)
    for group, code in (("none", 2), ("group", 0)):
        ended = run_command(group, code)
        assert ended.returncode == code and ended.stderr.strip().splitlines()[-1] == "finalization ran", ended.stderr


def test_without_a_process_group_the_status_is_raised_as_system_exit():
    # in-process callers (tests, notebooks) keep SystemExit: nothing ends the interpreter under them
    with pytest.raises(SystemExit) as ended:
        exit_program(2)
    assert ended.value.code == 2
    with pytest.raises(SystemExit) as ended:
        exit_program(0)
    assert ended.value.code == 0
