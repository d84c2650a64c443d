"""File-to-file byte copies for the passthrough writers: the kernel copies (``copy_file_range``),
so tensor bytes never pass through Python and memory stays flat whatever the model size."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from merge_core.errors import SelfMergeError

COPY_CHUNK = 64 << 20


def write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def copy_range(src_fd: int, dst_fd: int, src_offset: int, n_bytes: int) -> None:
    """Copy in the kernel where it can (no user-space buffer); fall back to pread/write."""
    while n_bytes > 0:
        try:
            copied = os.copy_file_range(src_fd, dst_fd, min(n_bytes, COPY_CHUNK), src_offset)
        except (OSError, AttributeError):
            copied = 0
        if copied <= 0:
            chunk = os.pread(src_fd, min(n_bytes, COPY_CHUNK), src_offset)
            if not chunk:
                raise SelfMergeError("the source file ended before its last tensor: it is truncated")
            write_all(dst_fd, chunk)
            copied = len(chunk)
        src_offset += copied
        n_bytes -= copied


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def written_as_partial(final: Path, folder: bool = False) -> Iterator[Path]:
    """Write under ``<final>.partial`` (a file, or a folder with ``folder``), renamed to ``final``
    when the block ends. On any failure (an error, a full disk, Ctrl-C) the partial is removed, so
    no command leaves half a model behind, and a crash never leaves one under the final name."""
    partial = final.with_name(final.name + ".partial")
    _remove(partial)  # left by a process that was killed
    if folder:
        partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        _remove(partial)
        raise
    os.replace(partial, final)
