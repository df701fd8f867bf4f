"""Publishing a folder atomically: everything is written and flushed elsewhere, then one rename makes it visible.

Used for trainer checkpoints (:mod:`trl_renyi.training.checkpoint`) and for every ensemble save
(:mod:`trl_renyi.model.saving`). A folder replaced this way is, at every moment, either the complete old one or the
complete new one: on Linux (``renameat2`` with ``RENAME_EXCHANGE``) and macOS (``renamex_np`` with ``RENAME_SWAP``)
the two folders trade places in one system call. Where neither exists, the old folder is first renamed aside and the
new one renamed in; a crash between those two renames leaves the old folder complete under the aside name.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
_RENAME_SWAP = 2  # macOS sys/stdio.h
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (names created, renamed or removed in it) to stable storage, where the OS allows."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file below ``folder`` and the folders themselves to stable storage."""
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(root))


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing folders in one system call; ``False`` where the OS or file system has no such call."""
    libc = ctypes.CDLL(None, use_errno=True)
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        result = libc.renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        result = libc.renamex_np(os.fsencode(first), os.fsencode(second), _RENAME_SWAP)
    else:
        return False
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(second))


def replace_folder(staged: Path, target: Path) -> None:
    """Make the complete folder ``staged`` appear at ``target`` in one rename, replacing an older ``target``.

    Args:
        staged: the new folder, fully written and flushed, on the same file system as ``target``.
        target: where it goes; an existing folder there is removed once the new one is in place.
    """
    staged, target = Path(staged), Path(target)
    old = None
    if target.is_dir() and any(target.iterdir()):
        if _exchange(staged, target):
            old = staged  # the two folders traded places
        else:
            old = staged.with_name(staged.name + ".old")
            os.replace(target, old)
            os.replace(staged, target)
    else:
        os.replace(staged, target)  # rename(2) replaces a missing or empty folder in one step
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
