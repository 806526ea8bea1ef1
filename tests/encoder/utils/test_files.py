"""encoder/utils/files.py: a failed write is recognised by the errno behind it, wherever in the exception's chain
it sits and whatever the message says; only torch's and safetensors' errno-less writer errors are read as text
(those cases are in tests/faults/test_disks_and_out_paths.py)."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import pytest
import torch

from encoder.utils.errors import UserError
from encoder.utils.files import write_errno


def _raised(make):
    try:
        make()
    except Exception as err:  # noqa: BLE001 - the test inspects whatever was raised
        return err
    raise AssertionError("nothing was raised")


def _wrap_cause(inner: BaseException, outer: Exception):
    def make():
        raise outer from inner
    return make


def _wrap_context(inner: OSError, outer: Exception, suppress: bool = False):
    def make():
        try:
            raise inner
        except OSError:
            if suppress:
                raise outer from None
            raise outer
    return make


def test_a_wrapped_os_error_is_found_by_its_errno_whatever_the_message():
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    read_only = OSError(errno.EROFS, os.strerror(errno.EROFS), "/x/model.safetensors")
    assert write_errno(_raised(_wrap_cause(full, RuntimeError("saving the shard failed")))) == (errno.ENOSPC, None)
    assert write_errno(_raised(_wrap_context(read_only, ValueError("could not export")))) == \
        (errno.EROFS, "/x/model.safetensors")
    two_deep = _raised(_wrap_cause(_raised(_wrap_context(full, RuntimeError("inner"))), RuntimeError("outer")))
    assert write_errno(two_deep) == (errno.ENOSPC, None)


def test_what_the_chain_does_not_make_a_failed_write():
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert write_errno(_raised(_wrap_context(full, RuntimeError("a bug"), suppress=True))) is None  # from None
    assert write_errno(_raised(_wrap_cause(full, UserError("already one line")))) is None
    assert write_errno(_raised(_wrap_cause(OSError(errno.EIO, "Input/output error"), RuntimeError("x")))) is None
    assert write_errno(RuntimeError("a bug with no cause")) is None
    looped = RuntimeError("a")
    looped.__context__ = RuntimeError("b")
    looped.__context__.__context__ = looped
    assert write_errno(looped) is None


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="no /dev/full here")
def test_torch_save_into_an_open_file_on_a_full_device_is_recognised_by_errno():
    """Saved to an open file, torch's writer error is raised while handling the file's OSError: the errno is
    found there even when torch rewords its own message."""
    f = open("/dev/full", "wb")  # noqa: SIM115 - closed below, where its own flush fails too
    err = _raised(lambda: torch.save({"state": torch.zeros(4096)}, f))
    with contextlib.suppress(OSError):
        f.close()
    assert isinstance(err, RuntimeError)  # torch's own error, not the file's
    err.args = ("a message torch might use one day",)
    assert write_errno(err) == (errno.ENOSPC, None)
