"""Atomic files and directories, and the checks that come before them: every output of the toolkit goes through here.

A directory is assembled in a temporary sibling and renamed into place only when complete (a file likewise), so
an interrupted or failed write never leaves a half-written result where a user (or LLaVA) would load it; a full
or read-only disk, or an output path under a file, is one line naming the path, checked up front where it can be.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from safetensors import SafetensorError

from .errors import UserError


def check_output_dir(out: str | Path, overwrite: bool, flag: str = "--out") -> Path:
    """Fail early (before any work) when `out` exists and may not be replaced, or cannot be written: its folder
    must be a directory (or creatable: no part of the path a file) and writable. `flag` is the option to change."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"output directory {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a directory; choose another {flag}")
    check_output_parent(out, flag)
    return out


def check_output_file(path: str | Path, flag: str = "--out") -> Path:
    """`check_output_dir` for a result file (an existing one is replaced): not a directory, in a writable folder."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"output {path} is a directory; give a file path")
    check_output_parent(path, flag)
    return path


def check_output_parent(out: Path, flag: str = "--out") -> None:
    """The folder `out` is written into exists as a directory, or can be created (the nearest existing folder
    above it is a directory), and that folder is writable."""
    existing = Path(out).parent  # as the user wrote it, for the message
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot write {out}: {existing} is a file, not a directory; choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = "is on a read-only file system" if _read_only(existing) else "is not writable (permission denied)"
        raise UserError(f"cannot write {out}: {existing} {reason}; choose a writable {flag}")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# Why a write failed, and what the user can do; the errnos a write into --out raises because of the disk or the
# path (anything else is left as it is: it is a bug or another kind of problem).
_WRITE_FAILURES = {
    errno.ENOSPC: ("disk full (no space left on device)", "free space or choose another {flag}"),
    errno.EDQUOT: ("disk quota exceeded", "free space or choose another {flag}"),
    errno.EROFS: ("read-only file system", "choose a writable {flag}"),
    errno.EACCES: ("permission denied", "choose a writable {flag}"),
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "choose another {flag}"),
    errno.EEXIST: ("a file is in the way (it exists and is not a directory)", "choose another {flag}"),
}
# Unambiguous wherever they come from; the others only count when they concern the output's own paths.
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
_STRERRORS = {os.strerror(code): code for code in _WRITE_FAILURES}
# Two libraries give no errno for a failed write, only a message, so for them alone the message is read (checked
# with torch 2.14 and safetensors 0.8 on a full tmpfs, /dev/full and a read-only mount):
# - torch.save to a path: its zip writer (caffe2/serialize/inline_container.cc) raises a bare RuntimeError with no
#   cause (its context, if any, is another errno-less RuntimeError, "basic_ios::clear: iostream error"): a short
#   write ("unexpected pos N vs M", "... file write failed") or a failed open ("open file failed with strerror:
#   Read-only file system"); a missing folder is "Parent directory P does not exist.". (Saved to an open file
#   instead, the OSError is its context and is found by errno; the project keeps paths: the archive's inner
#   folder is named after the file, so the bytes would change.)
# - safetensors: SafetensorError formats Rust's io::Error into its text ("... (os error 28) at path \"...\"")
#   and carries no errno, cause or context.
_TORCH_WRITER = re.compile(r"inline_container\.cc.*(?:open file failed with strerror: (?P<strerror>[^\n]+?)\s*$|"
                           r"unexpected pos \d+ vs \d+|file write failed)", re.DOTALL)
_TORCH_PARENT = re.compile(r"^Parent directory (?P<path>.+) does not exist\.$")
_SAFETENSORS_IO = re.compile(r"I/O error: .*\(os error (?P<code>\d+)\)(?: at path \"(?P<path>[^\"]*)\")?")


def write_errno(exc: BaseException) -> tuple[int, str | None] | None:
    """(errno, path or None) when `exc` is a failed write for a reason of `_WRITE_FAILURES`, else None.

    The errno comes from the first OSError in `exc`'s chain (`exc`, then what caused it: `__cause__`, or the
    `__context__` it was raised while handling), so a library or caller that wraps the OS error, whatever its
    words, keeps it. Only where the chain holds no OSError are torch.save's and safetensors' own writer
    messages read (see above), so an unrelated RuntimeError is never taken for a disk problem. A UserError is
    already its one line, and an interrupt is no failed write, whatever they were raised while handling."""
    if isinstance(exc, UserError) or not isinstance(exc, Exception):
        return None
    chain = _exception_chain(exc)
    for link in chain:
        if isinstance(link, OSError):
            return (link.errno, link.filename) if link.errno in _WRITE_FAILURES else None
    for link in chain:
        found = _library_write_errno(link)
        if found is not None:
            return found
    return None


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions behind it, as a traceback shows them (a context hidden by `from None` is not)."""
    chain: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and all(link is not seen for seen in chain):
        chain.append(link)
        link = link.__cause__ if link.__cause__ is not None or link.__suppress_context__ else link.__context__
    return chain


def _library_write_errno(exc: BaseException) -> tuple[int, str | None] | None:
    """The errno behind torch.save's or safetensors' failed write, read from their message (they carry none)."""
    text = str(exc)
    if isinstance(exc, SafetensorError):
        match = _SAFETENSORS_IO.search(text)
        if match and int(match["code"]) in _WRITE_FAILURES:
            return int(match["code"]), match["path"]
        return None
    if isinstance(exc, RuntimeError):
        match = _TORCH_WRITER.search(text)
        if match:
            if match["strerror"] is None:
                return errno.ENOSPC, None  # a short write: the disk (or the quota) is full
            code = _STRERRORS.get(match["strerror"])
            return (code, None) if code is not None else None
        match = _TORCH_PARENT.match(text)
        if match and os.path.lexists(match["path"]) and not os.path.isdir(match["path"]):
            return errno.ENOTDIR, match["path"]
    return None


def write_failure(exc: BaseException, out: Path, tmp: Path | None = None, flag: str = "--out") -> UserError | None:
    """The one-line UserError for `exc` raised while writing `out` (through its temporary `tmp`), naming `out`,
    the file that failed, the reason and the fix; None when `exc` is no failed write of `out`."""
    found = write_errno(exc)
    if found is None:
        return None
    code, filename = found
    inside = filename is None or _concerns(Path(filename), out, tmp)
    if not inside and code not in _DISK_ERRNOS:
        return None  # e.g. an unreadable input: not a problem of the output
    reason, fix = _WRITE_FAILURES[code]
    detail = ""
    if filename is not None:
        shown = _public_name(Path(filename), out, tmp)
        if shown != out:
            detail = f" ({shown})" if inside else f" (while writing {shown})"
    return UserError(f"cannot write {out}{detail}: {reason}; {fix.format(flag=flag)}")


def environment_error_line(exc: BaseException) -> str | None:
    """One line for a failed write (or open) that escaped the atomic writers, as `run_cli`'s last resort: the
    path from the error and the reason; None for anything else, which stays a traceback (a bug). The ambiguous
    errnos (permission denied, not a directory, exists) need the error's path to count."""
    found = write_errno(exc)
    if found is None:
        return None
    code, filename = found
    if filename is None and code not in _DISK_ERRNOS:
        return None
    reason = _WRITE_FAILURES[code][0]
    fix = {errno.ENOSPC: "free space or write elsewhere", errno.EDQUOT: "free space or write elsewhere",
           errno.EROFS: "choose a writable location", errno.EACCES: "check its permissions or choose another path",
           errno.ENOTDIR: "check the path", errno.EEXIST: "remove it or choose another path"}[code]
    return f"{filename if filename is not None else 'a write failed'}: {reason}; {fix}"


def _concerns(path: Path, out: Path, tmp: Path | None) -> bool:
    """Whether `path` is one of the output's own: in its temporary or in it, a sibling temporary, or a folder
    created for it."""
    path, out = Path(os.path.abspath(path)), Path(os.path.abspath(out))
    if tmp is not None and path.is_relative_to(os.path.abspath(tmp)):
        return True
    return (path.is_relative_to(out) or path in out.parents
            or (path.parent == out.parent and path.name.startswith(f".{out.name}.")))


def _public_name(path: Path, out: Path, tmp: Path | None) -> Path:
    """A path inside the temporary directory under the name it would have had in `out`."""
    if tmp is not None and Path(os.path.abspath(path)).is_relative_to(os.path.abspath(tmp)):
        return out / Path(os.path.abspath(path)).relative_to(os.path.abspath(tmp))
    if tmp is not None and os.path.abspath(path) == os.path.abspath(tmp):
        return out
    return path


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and the missing folders above it; return those created, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False, flag: str = "--out") -> Iterator[Path]:
    """Yield an empty temporary directory next to `out`; move it to `out` only if the block succeeds.

    On any failure the temporary directory (and folders created for it) are removed; a write that fails because
    of the disk or the path (full, read-only, not writable, a file in the way) becomes a one-line UserError."""
    out = check_output_dir(out, overwrite, flag)
    created: list[Path] = []
    tmp = old = None
    try:
        created = _make_parents(out.parent)
        tmp = owned_temporary_dir(out.parent, out.name)
        yield tmp
        make_readable(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{_owner()}-{tmp.name.rsplit('-', 1)[-1]}")
            out.rename(old)
        tmp.rename(out)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            with contextlib.suppress(OSError):
                old.rename(out)  # the earlier output stays in place
        _remove_empty(created)
        failure = write_failure(exc, out, tmp, flag)
        if failure is not None:
            raise failure from exc
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _owner() -> str:
    """host-pid: who writes a temporary sibling, so a later run can tell an abandoned one from a live one."""
    return f"{socket.gethostname().replace('-', '_')}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def owned_temporary_dir(parent: Path, name: str) -> Path:
    """A new `.NAME.tmp-HOST-PID-*` folder in `parent`, after removing the ones killed writers on this host left
    there: the temporary of `parent / NAME`, or of files that are then moved into `parent` one by one."""
    remove_stale_siblings(parent / name)
    return Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{_owner()}-", dir=parent))


def remove_stale_siblings(out: Path) -> list[Path]:
    """Remove the `.NAME.tmp-HOST-PID-*` / `.NAME.old-HOST-PID-*` siblings that a killed writer on this host left
    (for a real model, gigabytes); those of live processes and of other hosts are left alone."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:tmp|old)-(?P<host>[^-]+)-(?P<pid>\d+)(?:-.*)?$")
    host = socket.gethostname().replace("-", "_")
    removed = []
    for sibling in out.parent.glob(f".{out.name}.*"):
        match = pattern.match(sibling.name)
        if match is None or match["host"] != host or _pid_alive(int(match["pid"])):
            continue
        shutil.rmtree(sibling, ignore_errors=True) if sibling.is_dir() else sibling.unlink(missing_ok=True)
        removed.append(sibling)
    return removed


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks (checkpoints can be larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def make_readable(root: Path) -> None:
    """mkdtemp makes 0700 folders and save_pretrained 0600 weights; give the export the usual umask modes
    so another user or a serving process can load it."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_atomic(path: str | Path, write: Callable[[Path], object], flag: str = "--out") -> Path:
    """Create `path` through `write(tmp)` on a sibling temporary file renamed into place, so a reader never
    sees a half-written result and a failure leaves any earlier file intact (and no temporary file). A write
    that fails because of the disk or the path becomes a one-line UserError, as in `atomic_output_dir`."""
    path = check_output_file(path, flag)
    tmp = path.with_name(f".{path.name}.tmp-{_owner()}")
    created: list[Path] = []
    try:
        created = _make_parents(path.parent)
        remove_stale_siblings(path)
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        _remove_empty(created)
        failure = write_failure(exc, path, tmp, flag)
        if failure is not None:
            raise failure from exc
        raise
    return path
