"""The daemon's directory under ``local-directory``, locked for the daemon's whole life.

Every daemon holds an exclusive ``flock`` on ``memctl.lock`` inside its directory
(the lock file also names its pid). The kernel drops the lock when the process
dies, however it dies (SIGKILL, OOM killer), so a lock that can be taken means the
owner is gone: at start-up a daemon removes such stale ``memctl-spill-*``
directories, and leaves alone the ones whose lock is held (a live daemon sharing
the local directory) or that have no lock file (an older memctl's; it cannot tell).

The persistent directory (``memctl-data``) takes the same lock, so that two daemons
never use it at once; it is never reclaimed as stale and never removed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from memctl.sizes import format_bytes

from .errors import StartupError

logger = logging.getLogger("memctl")

SPILL_PREFIX = "memctl-spill-"
#: A directory being created, not yet under its real name (see ``create_spill_directory``).
STAGING_PREFIX = ".memctl-staging-"
PERSISTENT_NAME = "memctl-data"
LOCK_NAME = "memctl.lock"


@dataclass
class SpillDirectory:
    """A directory this daemon owns, and the open lock file that says so."""

    path: Path
    lock_fd: int

    def close(self, remove: bool) -> None:
        """Release the lock; remove the directory first if asked (a clean exit)."""
        if remove:
            shutil.rmtree(self.path, ignore_errors=True)
        os.close(self.lock_fd)


def _try_lock(path: Path) -> int | None:
    """An fd holding the exclusive lock on ``path``, or None if another process holds it.

    Raises FileNotFoundError when there is no lock file.
    """
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _size_of(directory: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(directory):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


def remove_stale_directories(root: Path, prefix: str = SPILL_PREFIX, kind: str = "spill") -> None:
    """Remove the ``<prefix>*`` directories in ``root`` (``memctl-spill-*``, or the
    shared-memory ones) whose owner is dead."""
    for candidate in sorted(root.glob(f"{prefix}*")):
        try:
            fd = _try_lock(candidate / LOCK_NAME)
        except OSError:
            continue  # no lock file (an older memctl's), or not ours to open: leave it
        if fd is None:
            continue  # its daemon is alive
        try:
            if not (candidate / LOCK_NAME).exists():
                continue  # removed meanwhile, by its owner's clean exit or another daemon
            # Still holding the lock, so no other daemon starting now removes it too.
            freed = _size_of(candidate)
            shutil.rmtree(candidate, ignore_errors=True)
            logger.info(
                "Removed stale %s directory %s of a memctl that is gone: %s freed",
                kind,
                candidate,
                format_bytes(freed),
            )
        finally:
            os.close(fd)


def make_directories(path: Path, mode: int) -> None:
    """Make ``path`` (``mode``) and its missing parents (0755), whatever the umask: under
    umask 000 ``mkdir -p`` makes parents 0777, and another user could then swap
    ``path`` for a directory of their own."""
    missing = []
    current = path
    while not os.path.lexists(current):
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)  # never wider than meant, even for a moment
        except FileExistsError:
            continue  # made meanwhile by someone else: the caller checks what it found
        directory.chmod(mode if directory == path else 0o755)


def create_spill_directory(root: Path) -> SpillDirectory:
    """A new private ``memctl-spill-*`` directory (0700) in ``root``, locked; stale ones
    of dead daemons are removed first.

    The directory is made and locked under a staging name, then renamed: a directory
    appears under ``memctl-spill-*`` only with its lock already held, so another daemon
    scanning at the same moment can never mistake it for a dead one's. (Locking after
    creating it in place would leave a window where its lock file exists unlocked.)
    A crash between the two steps leaves an empty staging directory, never data.
    """
    try:
        make_directories(root, 0o755)
        remove_stale_directories(root)
        return create_owned_directory(root, SPILL_PREFIX)
    except OSError as exc:
        raise StartupError(
            f"cannot create a spill directory in {root}: {exc.strerror}; "
            "choose another --local-directory"
        ) from exc


def create_owned_directory(root: Path, prefix: str) -> SpillDirectory:
    """A new ``<prefix>*`` directory (0700) in ``root``, locked before it appears
    under that name (``create_spill_directory`` says why). Raises OSError."""
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))  # mode 0700
    fd = os.open(staging / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # new and private: always free
    _write_pid(fd)
    path = root / (prefix + staging.name.removeprefix(STAGING_PREFIX))
    staging.rename(path)
    return SpillDirectory(path, fd)


def open_persistent_directory(root: Path) -> SpillDirectory:
    """``<root>/memctl-data`` (0700), locked; StartupError if a live daemon holds it."""
    path = root / PERSISTENT_NAME
    try:
        make_directories(path, 0o700)
        path.chmod(0o700)
        fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StartupError(
            f"cannot use {path}: {exc.strerror}; choose another --local-directory"
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StartupError(
            f"another memctl (pid {owner}) uses {path}; stop it, or give this one "
            "another --local-directory"
        ) from None
    _write_pid(fd)
    return SpillDirectory(path, fd)
