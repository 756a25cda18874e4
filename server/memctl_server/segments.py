"""Shared-memory segments: values the daemon holds in sealed memfds, not its heap.

A same-host client puts a large value by writing it into a memfd, sealing it
against writes, shrinking and growing, and passing the descriptor over the channel
(``channel.py``). The daemon checks the seals and the size, maps it read-only and
stores the mapping itself as the value (``Segment``, a ``mmap``): no byte is copied,
and since the memfd is sealed no process, the client included, can change it
afterwards. A Get over the channel passes the same descriptor back; the client
maps it, and its mapping stays valid after the key is deleted or spilled (the
kernel frees the pages when the last mapping and descriptor are gone, so segments
of a crashed client or daemon are reclaimed by the kernel itself).

A client that cannot pass descriptors writes a file in the daemon's shared-memory
directory (``ShmDirectory``, in /dev/shm, 0700) and names it; the daemon opens it
without following links, checks it belongs to the caller, unlinks it and copies it
into a sealed memfd of its own: one copy, after which the client's file is gone.

Accounting: a segment's bytes are managed bytes of its scope, like any value in
RAM; ``SegmentLedger`` counts the bytes of every segment the daemon holds, so that
the service's process reading (``MemoryService.measure``) adds them to its RSS
(less the shared pages its RSS already counts).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import re
import stat
import weakref
from collections.abc import Iterable
from pathlib import Path

import crc32c

from memctl.sizes import format_bytes

from .errors import InvalidArgument, ResourceExhausted
from .spilldir import LOCK_NAME, SpillDirectory, create_owned_directory, remove_stale_directories

logger = logging.getLogger(__name__)

#: The seals a memfd must carry before the daemon adopts it.
REQUIRED_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
ALL_SEALS = REQUIRED_SEALS | fcntl.F_SEAL_SEAL
#: What a segment is made of.
Buffer = bytes | bytearray | memoryview | mmap.mmap
SHM_PREFIX = "memctl-shm-"
#: The name of the memfds the daemon makes (keys are user data: never in a name).
SEGMENT_NAME = "memctl-segment"
#: The name of a file a client writes in the shared-memory directory: its pid, a dash,
#: then anything that is not a slash (the daemon's own files do not match).
CLIENT_FILE_NAME = re.compile(r"([0-9]{1,10})-[^/\x00]{1,200}")
#: Bytes copied per sendfile call when taking over a /dev/shm file.
COPY_STEP = 1 << 30


class SegmentLedger:
    """Bytes and count of the segments alive in this daemon (any thread)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.count = 0

    def _added(self, size: int) -> None:
        self.bytes += size
        self.count += 1

    def _removed(self, size: int) -> None:
        self.bytes -= size
        self.count -= 1


LEDGER = SegmentLedger()


class Segment(mmap.mmap):
    """A sealed memfd mapped read-only, held as a stored value's bytes.

    ``fd`` is the daemon's descriptor of it, passed to Get callers; it is closed when
    the segment is garbage (the value deleted, spilled or replaced). ``crc`` is the
    value's CRC32C, computed the first time something asks (spilling it, a Get over
    gRPC): nothing travels, so nothing is checked on the way in.
    """

    fd: int
    _crc: int | None

    @property
    def crc(self) -> int:
        if self._crc is None:
            self._crc = int(crc32c.crc32c(self))
        return self._crc


def _segment(fd: int, size: int) -> Segment:
    """Map ``fd`` as a Segment, which owns it once this returns, counted in the ledger
    until freed (the caller still owns it if this raises)."""
    segment = Segment(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    segment.fd = fd
    segment._crc = None
    LEDGER._added(size)
    weakref.finalize(segment, _release, fd, size)
    return segment


def _release(fd: int, size: int) -> None:
    os.close(fd)
    LEDGER._removed(size)


def adopt_memfd(fd: int, size: int, what: str) -> Segment:
    """Take a client's memfd as a value of ``size`` bytes: the segment owns the
    descriptor once this returns. InvalidArgument (the descriptor still the caller's)
    unless it is a memfd sealed against writing, shrinking and growing, of exactly
    that size."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise InvalidArgument(
            f"{what}: the descriptor is not a memfd (memfd_create with "
            "MFD_ALLOW_SEALING); nothing was stored"
        ) from None
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        raise InvalidArgument(
            f"{what}: the memfd is not sealed against writes, shrinking and growing; "
            "add F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW (fcntl F_ADD_SEALS) before "
            "passing it. Nothing was stored"
        )
    actual = os.fstat(fd).st_size
    if actual != size:
        raise InvalidArgument(
            f"{what}: the memfd holds {actual} bytes, the frame declares {size}; nothing was stored"
        )
    if size == 0:
        raise InvalidArgument(f"{what}: an empty value travels inline, not as a memfd")
    return _segment(fd, size)


def new_segment(pieces: Iterable[Buffer], size: int) -> Segment:
    """A sealed segment holding ``pieces`` (``size`` bytes in all): for values the
    daemon hands out as segments that arrived otherwise (over gRPC, from disk)."""
    fd = os.memfd_create(SEGMENT_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        offset = 0
        for piece in pieces:
            view = memoryview(piece).cast("B")
            while view.nbytes:
                written = os.pwrite(fd, view, offset)
                offset += written
                view = view[written:]
        if offset != size:
            raise ValueError(f"a segment of {size} bytes was given {offset}")
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, ALL_SEALS)
        return _segment(fd, size)
    except BaseException:
        os.close(fd)
        raise


class ShmDirectory:
    """The daemon's directory in /dev/shm for clients that cannot pass descriptors.

    Locked for the daemon's life as its spill directory is (``spilldir.py``), so the
    directory of a daemon that died is removed by the next one to start; files that a
    client wrote and never handed over are removed when their writer is gone (their
    name starts with its pid: ``<pid>-<anything>``) or at the daemon's exit.
    """

    def __init__(self, directory: SpillDirectory):
        self._directory = directory
        self.path = directory.path

    @classmethod
    def create(cls, root: Path) -> ShmDirectory:
        remove_stale_directories(root, SHM_PREFIX, kind="shared-memory")
        return cls(create_owned_directory(root, SHM_PREFIX))

    def take(self, name: str, size: int, peer_uid: int, what: str) -> Segment:
        """The file ``name`` (written by a client of uid ``peer_uid``) as a sealed
        segment; the file is removed. InvalidArgument for a name outside the
        directory, a link, a file of another user or of another size."""
        if not CLIENT_FILE_NAME.fullmatch(name):
            raise InvalidArgument(
                f"{what}: {name!r} is not a client's file name in {self.path}; name a file "
                "directly inside the shared-memory directory the daemon advertised, called "
                "<your pid>-<anything>"
            )
        path = self.path / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                problem = "it is a symbolic link"
            else:
                problem = exc.strerror or str(exc)
            raise InvalidArgument(
                f"{what}: cannot open {path}: {problem}; nothing was stored"
            ) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidArgument(f"{what}: {path} is not a regular file; nothing was stored")
            if info.st_uid != peer_uid:
                raise InvalidArgument(
                    f"{what}: {path} belongs to uid {info.st_uid}, not to the caller (uid "
                    f"{peer_uid}); nothing was stored"
                )
            if info.st_size != size:
                raise InvalidArgument(
                    f"{what}: {path} holds {info.st_size} bytes, the frame declares {size}; "
                    "nothing was stored"
                )
            if size == 0:
                raise InvalidArgument(f"{what}: an empty value travels inline, not as a file")
            os.unlink(path)
            return _copy_to_segment(fd, size, name)
        finally:
            os.close(fd)

    def sweep(self) -> int:
        """Remove files whose writer (the pid their name starts with) is gone; how many."""
        removed = 0
        try:
            entries = list(os.scandir(self.path))
        except OSError:
            return 0
        for entry in entries:
            if entry.name == LOCK_NAME:
                continue
            match = CLIENT_FILE_NAME.fullmatch(entry.name)
            if match is not None and _alive(int(match[1])):
                continue
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError:
                continue
        if removed:
            logger.info("Removed %d shared-memory files that no client handed over", removed)
        return removed

    def close(self) -> None:
        self._directory.close(remove=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _copy_to_segment(source: int, size: int, name: str) -> Segment:
    fd = os.memfd_create(SEGMENT_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        offset = 0
        while offset < size:
            sent = os.sendfile(fd, source, offset, min(COPY_STEP, size - offset))
            if sent == 0:
                raise ResourceExhausted(
                    f"the shared-memory file {name!r} ended after {offset} of {size} bytes"
                )
            offset += sent
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, ALL_SEALS)
        return _segment(fd, size)
    except OSError as exc:
        os.close(fd)
        raise ResourceExhausted(
            f"taking over the shared-memory file {name!r} ({format_bytes(size)}) failed: "
            f"{exc.strerror}; nothing was stored"
        ) from None
    except BaseException:
        os.close(fd)
        raise
