"""Spill files: one value per file, self-describing and checksummed.

A spill file is a header, then the value's bytes as stored (raw, lz4 or zlib)::

    fixed part   magic "MCTLSPL1", encoding, flags, scope/key/metadata lengths,
                 value size, value CRC32C, body size, header CRC32C
    scope        UTF-8, the scope the value belongs to
    key          UTF-8
    metadata     the Put's opaque metadata
    padding      with the flag ``ALIGNED`` (large values), zeros up to the next
                 multiple of 4096 bytes, where the body then starts
    body         the value, encoded

The value's CRC32C is computed when it arrives (Put) and checked whenever the value
is read back, so a flipped bit, a truncated file or an undecodable frame is reported
as damage (``SpillFileDamaged``), never returned as data. The header has its own
CRC, so a daemon restarted with ``persist: true`` can trust what a file says it
holds (scope, key, metadata) before reading its body.

Files are written under a temporary name and renamed into place when complete: a
reader, or a daemon restarted after SIGKILL, never sees half a value.

Not covered here: which values are on disk (``store.py``), where the directory is
(``spilldir.py``).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import zlib
from dataclasses import dataclass, replace
from io import BufferedReader
from typing import IO, Literal, NamedTuple, Protocol

import crc32c

from memctl.chunks import unfilled_bytes

Compression = Literal["lz4", "zlib", "none"]
#: A value's bytes: ``mmap`` for a shared-memory segment (``segments.Segment``).
Value = bytes | bytearray | memoryview | mmap.mmap

MAGIC = b"MCTLSPL1"
#: magic, encoding, flags, scope length, key length, metadata length, value size,
#: value crc, body size.
_FIXED = struct.Struct("<8sBBHHIQIQ")
_CRC = struct.Struct("<I")
HEADER_SIZE = _FIXED.size + _CRC.size
SUFFIX = ".spill"
TEMP_SUFFIX = ".tmp"

_ENCODINGS: dict[int, Compression] = {0: "none", 1: "lz4", 2: "zlib"}
_ENCODING_IDS = {name: number for number, name in _ENCODINGS.items()}
#: Compress only if a sample shrinks below this fraction (as Dask's maybe_compress).
_WORTH_IT = 0.9
_SAMPLE = 64 * 1024
#: How much of a file is read at a time when streaming it back.
READ_SIZE = 1 << 20
#: Flag: the body starts at the next multiple of ``PAGE`` after the header. The kernel
#: copies between a file and memory at a third of its speed when the destination is
#: up to 31 bytes past the source modulo 4096 (measured on the 2-core test machine,
#: reading and writing): a body right after a header of any length falls there for
#: whole ranges of key lengths, a page-aligned body never does for a value's buffer.
ALIGNED = 1
PAGE = 4096
#: Bodies whose first piece is at least this large are aligned (a small value's file
#: is not worth a page more).
ALIGN_FROM = 64 * 1024


def checksum(data: Value, crc: int = 0) -> int:
    """CRC32C of ``data``, continuing ``crc`` (hardware-accelerated by the crc32c package)."""
    return int(crc32c.crc32c(data, crc))


class SpillFileDamaged(Exception):
    """A spill file is missing, truncated, corrupt or undecodable; the message says which."""


class Record(NamedTuple):
    """A value as the store holds it: its bytes, their CRC32C and the Put's metadata.
    (A tuple: one is made per value stored, and a frozen dataclass costs three times
    as much to make.)"""

    data: Value
    crc: int
    metadata: bytes

    @property
    def size(self) -> int:
        return nbytes(self.data)


def nbytes(value: Value) -> int:
    """Size of a bytes-like value in RAM."""
    return value.nbytes if isinstance(value, memoryview) else len(value)


@dataclass(frozen=True, slots=True)
class FileHeader:
    """What a spill file says about the value it holds (one per value on disk: slots)."""

    scope: str
    key: str
    metadata: bytes
    size: int
    crc: int
    encoding: Compression
    body_size: int
    #: The body starts on a page boundary (``ALIGNED``).
    aligned: bool = False

    def encode(self) -> bytes:
        scope, key = self.scope.encode("utf-8", "surrogatepass"), self.key.encode("utf-8")
        fixed = _FIXED.pack(
            MAGIC,
            _ENCODING_IDS[self.encoding],
            ALIGNED if self.aligned else 0,
            len(scope),
            len(key),
            len(self.metadata),
            self.size,
            self.crc,
            self.body_size,
        )
        variable = scope + key + self.metadata
        header_crc = _CRC.pack(checksum(variable, checksum(fixed)))
        return b"".join((fixed, header_crc, variable, bytes(self.padding)))

    @property
    def padding(self) -> int:
        """Zeros between the header and the body."""
        return -_unpadded_length(self.scope, self.key, self.metadata) % PAGE if self.aligned else 0

    @property
    def length(self) -> int:
        """Bytes the header takes in the file, padding included: where the body starts."""
        return _unpadded_length(self.scope, self.key, self.metadata) + self.padding


def _unpadded_length(scope: str, key: str, metadata: bytes) -> int:
    return (
        HEADER_SIZE
        + len(scope.encode("utf-8", "surrogatepass"))
        + len(key.encode("utf-8"))
        + len(metadata)
    )


def header_length(scope: str, key: str, metadata: bytes, size: int = 0) -> int:
    """Bytes the header of a spill file takes before a value of ``size`` bytes: with
    the padding of an aligned body if the value is large enough to get one."""
    unpadded = _unpadded_length(scope, key, metadata)
    return unpadded + (-unpadded % PAGE if size >= ALIGN_FROM else 0)


def read_header(fh: IO[bytes], name: str) -> FileHeader:
    """Parse and check a file's header; ``SpillFileDamaged`` if it cannot be trusted."""
    fixed = fh.read(HEADER_SIZE)
    if len(fixed) < HEADER_SIZE or not fixed.startswith(MAGIC):
        raise SpillFileDamaged(f"spill file {name} has no valid header (truncated or overwritten)")
    _, encoding, flags, scope_len, key_len, meta_len, size, crc, body_size = _FIXED.unpack(
        fixed[: _FIXED.size]
    )
    (header_crc,) = _CRC.unpack(fixed[_FIXED.size :])
    variable = fh.read(scope_len + key_len + meta_len)
    if (
        len(variable) != scope_len + key_len + meta_len
        or checksum(variable, checksum(fixed[: _FIXED.size])) != header_crc
        or encoding not in _ENCODINGS
        or flags & ~ALIGNED
    ):
        raise SpillFileDamaged(f"spill file {name} has a corrupt header")
    try:
        scope = variable[:scope_len].decode("utf-8", "surrogatepass")
        key = variable[scope_len : scope_len + key_len].decode("utf-8")
    except UnicodeDecodeError:
        raise SpillFileDamaged(f"spill file {name} has a corrupt header") from None
    header = FileHeader(
        scope,
        key,
        bytes(variable[scope_len + key_len :]),
        size,
        crc,
        _ENCODINGS[encoding],
        body_size,
        bool(flags & ALIGNED),
    )
    if len(fh.read(header.padding)) != header.padding:
        raise SpillFileDamaged(f"spill file {name} is truncated")
    return header


# --- encoding ------------------------------------------------------------------------
class _Encoder(Protocol):
    def compress(self, data: Value) -> bytes: ...
    def flush(self) -> bytes: ...


class _Raw:
    def compress(self, data: Value) -> Value:
        return data

    def flush(self) -> bytes:
        return b""


class _Lz4:
    def __init__(self) -> None:
        import lz4.frame

        self._compressor = lz4.frame.LZ4FrameCompressor()
        self._started = False

    def compress(self, data: Value) -> bytes:
        head = b""
        if not self._started:
            head, self._started = self._compressor.begin(), True
        return head + bytes(self._compressor.compress(data))

    def flush(self) -> bytes:
        head = b"" if self._started else self._compressor.begin()
        self._started = True
        return head + bytes(self._compressor.flush())


def _encoder(kind: Compression) -> _Encoder:
    if kind == "lz4":
        return _Lz4()
    if kind == "zlib":
        return zlib.compressobj(1)
    return _Raw()  # type: ignore[return-value]


def worth_compressing(kind: Compression, sample: Value) -> bool:
    """Whether ``kind`` shrinks a sample of the value enough to be worth it."""
    if kind == "none" or nbytes(sample) == 0:
        return False
    view = memoryview(sample)[:_SAMPLE]
    if kind == "lz4":
        import lz4.frame

        packed = len(lz4.frame.compress(view))
    else:
        packed = len(zlib.compress(view, 1))
    return packed < _WORTH_IT * view.nbytes


class _Decoder(Protocol):
    """Decodes a body piece by piece, never more than ``max_length`` bytes at a time
    (a small compressed piece may hold a great deal of data)."""

    @property
    def needs_input(self) -> bool:
        """False while output is pending from what was already given."""

    def decode(self, raw: bytes, max_length: int) -> bytes: ...


class _RawDecoder:
    needs_input = True

    def decode(self, raw: bytes, max_length: int) -> bytes:
        return raw


class _Lz4Decoder:
    def __init__(self) -> None:
        import lz4.frame

        self._decompressor = lz4.frame.LZ4FrameDecompressor()

    @property
    def needs_input(self) -> bool:
        return bool(self._decompressor.needs_input)

    def decode(self, raw: bytes, max_length: int) -> bytes:
        return bytes(self._decompressor.decompress(raw, max_length))


class _ZlibDecoder:
    def __init__(self) -> None:
        self._decompressor = zlib.decompressobj()
        self._tail = b""

    @property
    def needs_input(self) -> bool:
        return not self._tail

    def decode(self, raw: bytes, max_length: int) -> bytes:
        out = self._decompressor.decompress(self._tail + raw, max_length)
        self._tail = self._decompressor.unconsumed_tail
        return out


def _decoder(kind: Compression) -> _Decoder:
    if kind == "lz4":
        return _Lz4Decoder()
    if kind == "zlib":
        return _ZlibDecoder()
    return _RawDecoder()


# --- writing -------------------------------------------------------------------------
class SpillWriter:
    """Writes one value into a new spill file, chunk by chunk, never holding it whole.

    The file is created 0600 under a temporary name; ``commit`` writes the final
    header (now that size and CRC are known) and renames it into place. ``abort``
    (or any failure) removes it. ``crc``: the value's CRC32C when the caller already
    has it (a value spilled from RAM keeps the one taken when it arrived, so damage
    suffered in RAM is caught on reading back); else the bytes are checksummed as
    they are written.
    """

    def __init__(
        self,
        directory: str,
        name: str,
        *,
        scope: str,
        key: str,
        metadata: bytes,
        compression: Compression,
        crc: int | None = None,
    ):
        self.path = os.path.join(directory, name + SUFFIX)
        self.temp_path = os.path.join(directory, name + TEMP_SUFFIX)
        self._header = FileHeader(scope, key, metadata, 0, 0, compression, 0)
        self._compression = compression
        self._encoder: _Encoder | None = None
        self.size = 0
        self.crc = crc or 0
        self._checksumming = crc is None
        self.body_size = 0
        fd = os.open(self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._file: IO[bytes] = open(fd, "wb")  # noqa: SIM115  (closed in commit/abort)

    def write(self, data: Value) -> None:
        """Append the next piece of the value."""
        try:
            if self._encoder is None:
                # Decide on the first piece, as Dask's maybe_compress samples a value.
                if not worth_compressing(self._compression, data):
                    self._compression = "none"
                self._encoder = _encoder(self._compression)
                aligned = nbytes(data) >= ALIGN_FROM
                self._header = replace(self._header, aligned=aligned)
                self._file.write(self._header.encode())  # a placeholder, rewritten at commit
            if self._checksumming:
                self.crc = checksum(data, self.crc)
            self.size += nbytes(data)
            self._emit(self._encoder.compress(data))
        except BaseException:
            self.abort()
            raise

    def _emit(self, body: Value) -> None:
        self._file.write(body)
        self.body_size += nbytes(body)

    def commit(self) -> tuple[FileHeader, int]:
        """Finish the file; its header and its size on disk."""
        try:
            if self._encoder is None:
                self._compression, self._encoder = "none", _Raw()  # type: ignore[assignment]
            assert self._encoder is not None
            self._emit(self._encoder.flush())
            header = FileHeader(
                self._header.scope,
                self._header.key,
                self._header.metadata,
                self.size,
                self.crc,
                self._compression,
                self.body_size,
                self._header.aligned,
            )
            self._file.seek(0)
            self._file.write(header.encode())
            self._file.close()
            os.rename(self.temp_path, self.path)
        except BaseException:
            self.abort()
            raise
        return header, header.length + self.body_size

    def abort(self) -> None:
        """Remove the unfinished file."""
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.temp_path)


# --- reading -------------------------------------------------------------------------
class SpillReader:
    """Reads a value back from its spill file in pieces, checking it as it goes.

    ``read()`` returns the next piece, and ``b""`` at the end; before the end is
    reported the size and CRC are checked, so a caller that holds back one piece
    never hands out a value that fails them.
    """

    def __init__(self, path: str, key: str, expected_crc: int | None = None):
        self.path, self.key = path, key
        try:
            self._file: BufferedReader = open(path, "rb")  # noqa: SIM115  (closed in close)
        except FileNotFoundError:
            raise SpillFileDamaged(f"the spill file of {key!r} is missing") from None
        except OSError as exc:
            raise SpillFileDamaged(f"the spill file of {key!r} cannot be read: {exc}") from None
        try:
            self.header = read_header(self._file, os.path.basename(path))
            if self.header.key != key or (
                expected_crc is not None and self.header.crc != expected_crc
            ):
                raise SpillFileDamaged(f"the spill file of {key!r} holds another value")
        except BaseException:
            self._file.close()
            raise
        self._decoder = _decoder(self.header.encoding)
        self._body_left = self.header.body_size
        self._size = 0
        self._crc = 0
        self._done = False

    def _damaged(self, what: str) -> SpillFileDamaged:
        return SpillFileDamaged(f"the spill file of {self.key!r} is {what}")

    def read(self, max_length: int = READ_SIZE) -> bytes:
        """The next decoded piece of the value (at most ``max_length`` bytes); ``b""``
        once it is whole and checked."""
        while not self._done:
            raw = b""
            if self._decoder.needs_input:
                if not self._body_left:
                    self._finish()
                    return b""
                raw = self._read_body(min(max_length, self._body_left))
            try:
                piece = self._decoder.decode(raw, max_length)
            except Exception as exc:  # lz4's RuntimeError, zlib's error: undecodable
                raise self._damaged(f"undecodable ({type(exc).__name__}: {exc})") from None
            self._decoded(piece)
            if piece:
                return piece
        return b""

    def read_into(self, buffer: memoryview) -> int:
        """Decode the next piece of the value into ``buffer``; how many bytes, 0 once it
        is whole and checked. A raw body goes from the file straight into ``buffer``."""
        if self.header.encoding != "none" or self._done:
            piece = self.read(max(buffer.nbytes, 1))
            buffer[: len(piece)] = piece
            return len(piece)
        if not self._body_left:
            self._finish()
            return 0
        if not buffer.nbytes:
            raise self._damaged("corrupt (it decodes to more bytes than it held)")
        target = buffer[: min(buffer.nbytes, self._body_left)]
        try:
            count = self._file.readinto(target)
        except OSError as exc:
            raise self._damaged(f"unreadable ({exc})") from None
        if not count:
            raise self._damaged("truncated")
        self._body_left -= count
        self._decoded(target[:count])
        return count

    def _read_body(self, length: int) -> bytes:
        try:
            raw = self._file.read(length)
        except OSError as exc:
            raise self._damaged(f"unreadable ({exc})") from None
        if not raw:
            raise self._damaged("truncated")
        self._body_left -= len(raw)
        return raw

    def _decoded(self, piece: Value) -> None:
        """Count and checksum a piece as it is handed out (while it is in the cache)."""
        self._size += nbytes(piece)
        if self._size > self.header.size:
            raise self._damaged("corrupt (it decodes to more bytes than it held)")
        self._crc = checksum(piece, self._crc)

    def _finish(self) -> None:
        """The body is read: check that it was the whole value, unchanged."""
        self._done = True
        if self._size != self.header.size:
            raise self._damaged(
                f"truncated or corrupt ({self._size} of {self.header.size} bytes decoded)"
            )
        if self._crc != self.header.crc:
            raise self._damaged("corrupt (its checksum does not match)")
        if self._file.read(1):
            raise self._damaged("longer than its header says")

    def read_all(self) -> bytes:
        """The whole value, checked, read into one buffer of the size the header says."""
        value, view = unfilled_bytes(self.header.size)
        filled = 0
        try:
            while count := self.read_into(view[filled : filled + READ_SIZE]):
                filled += count
        finally:
            view.release()
        return value

    def close(self) -> None:
        self._file.close()


def read_record(path: str, key: str, expected_crc: int | None = None) -> Record:
    """A whole value from its spill file, checked; ``SpillFileDamaged`` if it is not right."""
    reader = SpillReader(path, key, expected_crc)
    try:
        data = reader.read_all()
    finally:
        reader.close()
    return Record(data, reader.header.crc, reader.header.metadata)


def scan_header(path: str) -> FileHeader:
    """The header of a spill file, for a daemon finding its files again."""
    try:
        with open(path, "rb") as fh:
            return read_header(fh, os.path.basename(path))
    except OSError as exc:
        raise SpillFileDamaged(f"spill file {path} cannot be read: {exc}") from None
