"""One writer per run directory: workers end with their launcher, and a run refuses to start beside a live one.

torchrun and `accelerate launch` start each worker in a session of its own, so a `kill -9` of the launcher (or
a lost terminal) leaves the workers training as orphans; the documented way to continue ("run the same command
again") would then race them over the same checkpoints. So:

- `watch_launcher`: a worker that a launcher started ends (one line on stderr) once that launcher is gone;
- `RunLock`: the main process records itself in the run directory; a new run there refuses to start while that
  process is alive (the case the watch cannot see: the `deepspeed` launcher's own child launcher outliving it,
  or the same command started twice).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from ..utils.errors import UserError

POLL_SECONDS = 1.0  # how often a worker looks for its launcher
ORPHANED_EXIT = 1  # the exit status of a worker whose launcher is gone
LOCK_FILE = ".run.lock"  # in the run's checkpoint directory: the live main process that trains there

_watching = False


def watch_launcher() -> None:
    """In a process started by a launcher (torchrun, accelerate launch, deepspeed: they set LOCAL_RANK), end the
    process once its parent, the launcher, is gone: a daemon thread watches the parent pid (a process whose parent
    dies is handed to init or a subreaper), which unlike PR_SET_PDEATHSIG does not also fire when merely the
    launcher's thread that started the worker ends. Processes started without a launcher are left alone."""
    global _watching
    if _watching or "LOCAL_RANK" not in os.environ:
        return
    _watching = True
    threading.Thread(target=_end_with, args=(os.getppid(),), name="launcher-watch", daemon=True).start()


def _end_with(launcher: int) -> None:
    while os.getppid() == launcher:
        time.sleep(POLL_SECONDS)
    print(f"error: the launcher (pid {launcher}) that started this worker (pid {os.getpid()}) is gone; the worker "
          "stops too; run the same command again to resume from the newest checkpoint", file=sys.stderr, flush=True)
    os._exit(ORPHANED_EXIT)  # now: a checkpoint half-written is a `.partial` the next run removes


class RunLock:
    """`<root>/.run.lock`: host, pid and start time of the main process of the run training in `root`."""

    def __init__(self, root: Path):
        self.path = Path(root) / LOCK_FILE

    def refuse_live_holder(self) -> None:
        """Raise UserError when another live process on this host trains in this directory. Every rank asks,
        before the main process `claim`s it (so they all read the same holder and stop together)."""
        holder = self._holder()
        if holder is None or holder["host"] != socket.gethostname() or holder["pid"] == os.getpid():
            return  # none, of another host (its liveness cannot be seen from here), or this process's earlier run
        if _started(holder["pid"]) is None or _started(holder["pid"]) != holder.get("started"):
            return  # ended (or its pid now belongs to another process)
        raise UserError(f"{self.path.parent} is being trained by another run that is still alive (pid "
                        f"{holder['pid']}, perhaps the workers of a killed launcher); wait for it to end or stop it "
                        f"(kill {holder['pid']} and its fellow workers), then run the command again")

    def claim(self) -> None:
        """Record this process as the directory's writer (main process; a dead holder's record is replaced)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": _started(os.getpid())}
        tmp = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}")
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, self.path)

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # none, or a torn record: no live writer is known
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _started(pid: int) -> int | str | None:
    """When process `pid` started (clock ticks since boot, from Linux's /proc), so that a reused pid is not taken
    for the writer; without /proc, "alive" stands for it; None when no such process runs."""
    if Path("/proc/self/stat").is_file():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name's parenthesis
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, someone else's
    return "alive"
