"""Fault tier, disks and output paths: a full disk, a read-only file system and an --out whose folder is a file
end every writer with one `error:` line naming the path and the reason (exit 2), leave no output and no
temporary sibling behind, and keep an earlier output intact. eval and routing refuse a bad --out before they
load the model or encode anything.

Root ignores permission bits, so the faults are simulated at the system calls (open for writing, mkdir,
access, statvfs) for paths under one folder, the "disk"; the torch.save case writes to the real /dev/full.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from encoder.utils.cli import UserErrorParser, run_cli
from encoder.utils.errors import UserError
from encoder.utils.files import atomic_output_dir, write_atomic, write_errno
from mllm_bridge.cli import main as bridge_main
from upcycle.cli import main as upcycle_main
from upcycle.eval import commands as analysis_commands

FAULTS = ("full", "read_only", "parent_is_file")
REASON = {"full": "disk full", "read_only": "read-only file system", "parent_is_file": "is a file, not a directory"}


class _FullFile:
    """A file opened on a full disk: it exists, every write fails as write(2) does (ENOSPC, no file name)."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    writelines = write

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _under(path, disk: Path) -> bool:
    try:
        return Path(os.path.abspath(os.fspath(path))).is_relative_to(disk)
    except TypeError:  # a file descriptor
        return False


def simulate(fault: str, disk: Path, monkeypatch) -> None:
    """Make `disk` full or read-only for this test (for every user, root included)."""
    real_open, real_mkdir, real_access, real_statvfs = builtins.open, os.mkdir, os.access, os.statvfs

    def fake_open(file, mode="r", *args, **kwargs):
        writing = any(c in mode for c in "wax+")
        if writing and _under(file, disk):
            if fault == "read_only":
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(file))
            return _FullFile(real_open(file, mode, *args, **kwargs))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)  # pathlib's write_text / write_bytes
    if fault == "read_only":
        def fake_mkdir(path, *args, **kwargs):
            if _under(path, disk):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
            return real_mkdir(path, *args, **kwargs)

        def fake_access(path, mode, *args, **kwargs):
            return False if mode & os.W_OK and _under(path, disk) else real_access(path, mode, *args, **kwargs)

        def fake_statvfs(path):
            st = real_statvfs(path)
            if not _under(path, disk):
                return st
            return os.statvfs_result((*tuple(st)[:8], st.f_flag | os.ST_RDONLY, st.f_namemax))

        monkeypatch.setattr(os, "mkdir", fake_mkdir)
        monkeypatch.setattr(os, "access", fake_access)
        monkeypatch.setattr(os, "statvfs", fake_statvfs)


def _mini_cli(write):
    parser = UserErrorParser(prog="writer")
    parser.add_argument("--out", required=True)
    parser.add_argument("--overwrite", action="store_true")
    parser.set_defaults(run=write)
    return parser


def _atomic_dir(args):
    with atomic_output_dir(args.out, args.overwrite) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"\0" * 4096)
    return 0


def _write_atomic(args):
    write_atomic(args.out, lambda tmp: tmp.write_text(json.dumps({"recall": 1.0})))
    return 0


@pytest.fixture(scope="module")
def eval_data(grids_dir):  # noqa: F811
    return grids_dir / "val.json"


def run_writer(writer: str, out: Path, base_clip_dir, eval_data, overwrite=False) -> int:
    more = ["--overwrite"] if overwrite else []
    if writer == "atomic_output_dir":
        return run_cli(_mini_cli(_atomic_dir), ["--out", str(out), *more])
    if writer == "write_atomic":
        return run_cli(_mini_cli(_write_atomic), ["--out", str(out)])
    if writer == "upcycle sparse":
        return upcycle_main(["sparse", "--base", str(base_clip_dir), "--out", str(out), "--num-experts", "2",
                             "--top-k", "1", *more])
    if writer == "upcycle eval":
        return upcycle_main(["eval", "--model", str(base_clip_dir), "--data", str(eval_data),
                             "--forward-batch-size", "8", "--out", str(out)])
    if writer == "mllm_bridge make-tiny-llm":
        return bridge_main(["make-tiny-llm", "--data", str(eval_data.parent), "--out", str(out),
                            "--hidden-size", "16"])
    raise AssertionError(writer)


OUT_NAME = {"atomic_output_dir": "model", "write_atomic": "result.json", "upcycle sparse": "clip-moe",
            "upcycle eval": "metrics.json", "mllm_bridge make-tiny-llm": "llm"}


def assert_one_line(capsys, out: Path, reason: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]  # besides progress bars
    assert len(lines) == 1, err
    assert lines[0].startswith("error: cannot write ") and str(out) in lines[0] and reason in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


def leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name == name or p.name.startswith(f".{name}."))


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("writer", list(OUT_NAME))
def test_a_bad_disk_or_out_path_is_one_line_and_leaves_nothing(writer, fault, tmp_path, monkeypatch, capsys,
                                                               base_clip_dir, eval_data):  # noqa: F811
    disk = tmp_path / "disk"
    disk.mkdir()
    if fault == "parent_is_file":
        (disk / "somefile.txt").write_text("not a folder\n")
        out = disk / "somefile.txt" / OUT_NAME[writer]
    else:
        out = disk / "runs" / OUT_NAME[writer]  # runs/ is created by the writer, and must go again
        simulate(fault, disk, monkeypatch)
    rc = run_writer(writer, out, base_clip_dir, eval_data)
    monkeypatch.undo()
    assert rc == 2
    assert_one_line(capsys, out, REASON[fault])
    assert not out.exists()
    expected = ["somefile.txt"] if fault == "parent_is_file" else []
    assert sorted(p.name for p in disk.iterdir()) == expected  # no output, no temporary, no empty runs/
    if fault == "parent_is_file":
        assert (disk / "somefile.txt").read_text() == "not a folder\n"


@pytest.mark.parametrize("writer", ["atomic_output_dir", "upcycle sparse"])
def test_a_full_disk_keeps_the_earlier_output(writer, tmp_path, monkeypatch, capsys, base_clip_dir, eval_data):
    out = tmp_path / "disk" / "model"
    out.mkdir(parents=True)
    (out / "config.json").write_text('{"earlier": true}')
    simulate("full", tmp_path / "disk", monkeypatch)
    rc = run_writer(writer, out, base_clip_dir, eval_data, overwrite=True)
    monkeypatch.undo()
    assert rc == 2
    assert_one_line(capsys, out, "disk full")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert json.loads((out / "config.json").read_text()) == {"earlier": True}
    assert leftovers(out.parent, "model") == ["model"]


def test_a_read_only_disk_mid_run_is_translated_at_the_write(tmp_path, monkeypatch, capsys):
    """The folder passed the up-front check (writable then), the file system turned read-only later."""
    disk = tmp_path / "disk"
    out = disk / "model"
    disk.mkdir()

    def write(args):
        with atomic_output_dir(args.out) as tmp:
            simulate("read_only", disk, monkeypatch)
            (tmp / "config.json").write_text("{}")

    rc = run_cli(_mini_cli(write), ["--out", str(out)])
    monkeypatch.undo()
    assert rc == 2
    line = assert_one_line(capsys, out, "read-only file system")
    assert f"{out / 'config.json'}" in line and ".tmp-" not in line  # the file under its final name
    assert list(disk.iterdir()) == []


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="no /dev/full here")
def test_torch_save_on_a_full_device_is_one_line(tmp_path, capsys):
    """torch.save reports a short write as RuntimeError ('[enforce fail at inline_container.cc] ... unexpected
    pos'); written to the real /dev/full through a link in the temporary directory."""
    out = tmp_path / "checkpoint"

    def write(args):
        with atomic_output_dir(args.out) as tmp:
            (tmp / "optimizer.pt").symlink_to("/dev/full")
            torch.save({"state": torch.zeros(4096)}, tmp / "optimizer.pt")

    assert run_cli(_mini_cli(write), ["--out", str(out)]) == 2
    assert_one_line(capsys, out, "disk full")
    assert list(tmp_path.iterdir()) == []


def test_safetensors_io_errors_are_recognised_and_other_errors_are_not():
    from safetensors import SafetensorError

    assert write_errno(SafetensorError('Error while serializing: I/O error: Read-only file system (os error 30) '
                                       'at path "/x/.tmpAb"')) == (errno.EROFS, "/x/.tmpAb")
    assert write_errno(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
                       ) == (errno.ENOSPC, None)
    assert write_errno(SafetensorError("Error while deserializing header: HeaderTooLarge")) is None
    assert write_errno(RuntimeError("[enforce fail at inline_container.cc:747] . open file failed with strerror: "
                                    "Read-only file system")) == (errno.EROFS, None)
    assert write_errno(RuntimeError("CUDA error: an illegal memory access was encountered")) is None
    assert write_errno(RuntimeError("[enforce fail at inline_container.cc:1] . file not found: archive/x")) is None
    assert write_errno(OSError(errno.EIO, "Input/output error")) is None


def test_unrelated_errors_in_a_writer_stay_tracebacks(tmp_path, capsys):
    def write(args):
        with atomic_output_dir(args.out) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("a genuine bug")

    with pytest.raises(RuntimeError, match="a genuine bug"):
        run_cli(_mini_cli(write), ["--out", str(tmp_path / "model")])
    assert list(tmp_path.iterdir()) == []

    def unreadable_input(args):  # permission denied on an input is not a problem of --out
        with atomic_output_dir(args.out):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "data.json"))

    assert run_cli(_mini_cli(unreadable_input), ["--out", str(tmp_path / "model")]) == 2  # run_cli's last resort
    assert capsys.readouterr().err == f"error: {tmp_path / 'data.json'}: permission denied; check its permissions " \
        "or choose another path\n"
    assert list(tmp_path.iterdir()) == []


def test_run_cli_last_resort_needs_a_known_errno(tmp_path, capsys):
    def escaping(args):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "data.json"))

    assert run_cli(_mini_cli(escaping), ["--out", "x"]) == 2
    line = capsys.readouterr().err.strip()
    assert line == f"error: {tmp_path / 'data.json'}: permission denied; check its permissions or choose another path"

    def io_error(args):
        raise OSError(errno.EIO, os.strerror(errno.EIO), "/dev/sda")

    with pytest.raises(OSError, match="Input/output error"):
        run_cli(_mini_cli(io_error), ["--out", "x"])


# eval and routing: a bad --out is refused before the model is loaded or a single pair encoded.

@pytest.fixture
def no_work(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded or the data encoded before --out was checked")

    for name in ("load_clip", "encode_pairs", "routing_stats", "read_pairs", "read_model_type"):
        monkeypatch.setattr(analysis_commands, name, fail)


def bad_out(case: str, tmp_path: Path, monkeypatch) -> Path:
    if case == "parent_is_file":
        (tmp_path / "somefile.txt").write_text("x")
        return tmp_path / "somefile.txt" / "out.json"
    if case == "a_directory":
        (tmp_path / "out.json").mkdir()
        return tmp_path / "out.json"
    (tmp_path / "ro").mkdir()
    simulate("read_only", tmp_path / "ro", monkeypatch)
    return tmp_path / "ro" / "out.json"


EXPECT = {"parent_is_file": "is a file, not a directory", "a_directory": "is a directory",
          "read_only": "read-only file system"}


@pytest.mark.parametrize("case", list(EXPECT))
@pytest.mark.parametrize("command", ["eval --out", "routing --out-json", "routing --out-png"])
def test_eval_and_routing_check_out_before_any_work(command, case, tmp_path, monkeypatch, capsys, no_work):
    name, flag = command.split()
    out = bad_out(case, tmp_path, monkeypatch)
    argv = [name, "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.json"), flag, str(out)]
    if flag == "--out-json":
        argv += ["--out-png", str(tmp_path / "routing.png")]
    assert upcycle_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and str(out) in err and EXPECT[case] in err
    if case != "a_directory":
        assert flag in err  # the fix names the option to change


def test_check_helpers_accept_fresh_nested_paths(tmp_path):
    from encoder.utils.files import check_output_dir, check_output_file

    assert check_output_dir(tmp_path / "a" / "b" / "model", overwrite=False) == tmp_path / "a" / "b" / "model"
    assert check_output_file(tmp_path / "a" / "r.json") == tmp_path / "a" / "r.json"
    assert not (tmp_path / "a").exists()  # checking creates nothing
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        check_output_dir(tmp_path, overwrite=False)


# swap-tower rewrites LLAVA_DIR/config.json in place: a failed write leaves it and no new backup.

@pytest.mark.parametrize("fault", ["full", "read_only"])
def test_swap_tower_on_a_bad_disk_leaves_the_config_and_no_backup(fault, llava_moe_dir, clip_moe_dir, tmp_path,
                                                                   monkeypatch, capsys):  # noqa: F811
    llava = tmp_path / "disk" / "llava"
    llava.mkdir(parents=True)
    shutil.copy(llava_moe_dir / "config.json", llava)
    before = (llava / "config.json").read_bytes()
    if fault == "full":  # the backup copy goes through; the new config's fsync reports the full disk
        monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    else:
        simulate("read_only", tmp_path / "disk", monkeypatch)
    rc = bridge_main(["swap-tower", str(llava), "--tower", str(clip_moe_dir)])
    monkeypatch.undo()
    assert rc == 2
    line = assert_one_line(capsys, llava, REASON[fault])
    assert "LLAVA_DIR" in line
    assert sorted(p.name for p in llava.iterdir()) == ["config.json"] and (llava / "config.json").read_bytes() == before


# The long jobs check where they will write before their first step (hours of training, then a failed write).

@pytest.mark.parametrize("case", ["parent_is_file", "read_only"])
@pytest.mark.parametrize("command", ["demo", "replicate", "compare"])
def test_long_jobs_check_out_before_their_first_step(command, case, tmp_path, monkeypatch, capsys):
    from upcycle.embedded import steps as main_job  # the step runner of demo and replicate

    def fail(*args, **kwargs):
        raise AssertionError("a step ran before --out was checked")

    monkeypatch.setattr(main_job, "run_step", fail)
    out = bad_out(case, tmp_path, monkeypatch).with_suffix("")
    extra = ["--base", str(tmp_path / "base"), "--data", str(tmp_path / "grids")] if command == "compare" else []
    assert upcycle_main([command, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and EXPECT[case] in err and "--out" in err, err
    assert not out.exists()


@pytest.mark.parametrize("case", ["parent_is_file", "read_only"])
def test_llava_training_checks_output_dir_before_loading_the_model(case, tmp_path, monkeypatch, capsys):
    from mllm_bridge.train import run
    from mllm_bridge.train.cli import main as train_main

    def fail(*args, **kwargs):
        raise AssertionError("the data was read or the model loaded before --output_dir was checked")

    for name in ("read_llava_samples", "check_tower", "build_training_model"):
        monkeypatch.setattr(run, name, fail)
    out = bad_out(case, tmp_path, monkeypatch).with_suffix("")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "0", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a digit"}]}]))
    argv = ["pretrain", "--model_name_or_path", str(tmp_path / "llm"), "--vision_tower", str(tmp_path / "tower"),
            "--data_path", str(data), "--image_folder", str(tmp_path), "--output_dir", str(out),
            "--tune_mm_mlp_adapter", "True"]
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and EXPECT[case] in err and "--output_dir" in err, err
