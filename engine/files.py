"""Atomic writes: a file or folder appears whole under its name, or not at all.

Every result file (metrics.json, progress.json, recipe.yaml, reports, caches) and every
model folder goes through these, so a killed or failed run never leaves half a file
that a later run or reader would take for a whole one. Written files are world-readable
(0644, folders 0755) whatever the temp file's own mode was: they are meant to be shared.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

FILE_MODE, DIR_MODE = 0o644, 0o755
TEMP_PREFIX = ".tmp-"  # hidden siblings; stale ones (a killed run's) are removed by remove_stale_temps


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp sibling of `path` to write to; renamed onto `path` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        tmp.chmod(FILE_MODE)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True))


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, replace: bool = False,
                  backup: Path | None = None) -> Iterator[Path]:
    """An empty temp sibling folder to fill; renamed to `target` when the block succeeds.

    With replace=True an existing target is swapped out (old one deleted after the
    rename); otherwise an existing target is an error (FileExistsError). `backup` names
    where the old target waits during the swap, for callers that fall back to it after a kill.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not replace:
        raise FileExistsError(f"{target} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{target.name}.", dir=target.parent))
    try:
        yield tmp
        make_readable(tmp)
        old = None
        if target.exists():
            old = backup or target.with_name(f"{TEMP_PREFIX}{target.name}.old-{uuid.uuid4().hex[:8]}")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_readable(folder: Path) -> None:
    """0755 folders and 0644 files under folder (mkdtemp makes 0700, mkstemp 0600)."""
    folder.chmod(DIR_MODE)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod(DIR_MODE if path.is_dir() else FILE_MODE)


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temp files/folders a killed run left directly inside folder."""
    stale = sorted(folder.glob(f"{TEMP_PREFIX}*")) if folder.is_dir() else []
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def fsync_tree(folder: Path) -> None:
    """Flush every file under folder, and the folders themselves, to the disk: what a rename
    then publishes survives a power loss, not only a killed process."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            _fsync(path, os.O_RDONLY)
    for path in [*sorted(p for p in folder.rglob("*") if p.is_dir()), folder]:
        fsync_dir(path)


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to the disk."""
    _fsync(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


LOCK_NAME = ".lock"  # the advisory lock of a folder a run writes (held while the run lives)


class FolderBusy(Exception):
    """Another live process holds the folder's lock; `pid` is its process id when known."""

    def __init__(self, folder: Path, pid: str) -> None:
        super().__init__(f"{folder} is in use by another process{f' (pid {pid})' if pid else ''}")
        self.folder, self.pid = folder, pid


class FolderLock:
    """An exclusive advisory lock (flock) on `folder/.lock`, which holds the owner's pid.

    The kernel drops the lock when its process ends, however it ends (a killed run leaves the
    file but no lock), so only a live run can refuse another. `release` deletes the file: a
    process that opened the old file just before is told by the inode check in `acquire`
    and locks the new one instead.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "FolderLock":
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                raise FolderBusy(self.path.parent, pid) from None
            except OSError as exc:  # a filesystem without locks (some network and FUSE mounts)
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP):
                    os.close(fd)
                    raise
                log.warning("%s: this filesystem refuses file locks (%s); a second run on the same "
                            "folder would not be refused", self.path.parent, exc.strerror)
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # released and deleted between our open and flock: lock the new file
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still held: nobody locks a file on its way out
        os.close(self.fd)
        self.fd = None
