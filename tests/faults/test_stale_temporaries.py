"""Fault tier, killed writers: the temporary siblings a killed atomic writer leaves are removed by the next
write of the same output on this host; a live writer's and another host's are left alone."""

import os
import socket
import subprocess
import sys

from encoder.utils.files import atomic_output_dir, write_atomic

HOST = socket.gethostname().replace("-", "_")


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_writers_temporaries_are_removed_by_the_next_write(tmp_path):
    out = tmp_path / "clip-moe"
    dead = dead_pid()
    stale_dir = tmp_path / f".clip-moe.tmp-{HOST}-{dead}-abc123"
    stale_old = tmp_path / f".clip-moe.old-{HOST}-{dead}-abc123"
    live = tmp_path / f".clip-moe.tmp-{HOST}-{os.getpid()}-zzz"
    other_host = tmp_path / f".clip-moe.tmp-elsewhere-{dead}-abc"
    unrelated = tmp_path / ".clip-moe-2.tmp-x"
    for folder in (stale_dir, stale_old, live, other_host, unrelated):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"0" * 1024)
    with atomic_output_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (out / "config.json").is_file()
    assert not stale_dir.exists() and not stale_old.exists()
    assert live.exists() and other_host.exists() and unrelated.exists()


def test_write_atomic_cleans_its_own_stale_temporary_files(tmp_path):
    target = tmp_path / "result.json"
    stale = tmp_path / f".result.json.tmp-{HOST}-{dead_pid()}"
    stale.write_text("half")
    write_atomic(target, lambda tmp: tmp.write_text("{}"))
    assert target.read_text() == "{}" and not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
