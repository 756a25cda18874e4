"""Values in Put and Get streams, encoded and decoded without copying them more than once.

A value travels in ``PutRequest{chunk}`` / ``GetResponse{chunk}`` messages: field 2 of
each message's oneof, so on the wire the tag byte 0x12, the payload's length as a
varint, then the payload. Built here, a chunk message costs one copy of its payload
(into the bytes gRPC sends) where protobuf took three (a slice, the message, its
serialization); read here, it is a view of the bytes gRPC received where protobuf
copied it. Any other message (a header, or a chunk encoded some other valid way) is
left to protobuf, so both ends still accept whatever protobuf would.

The receiving end fills one buffer of the size the header declared (``unfilled_bytes``)
instead of collecting chunks and joining them: one copy per chunk, and no second
buffer as large as the value.
"""

from __future__ import annotations

import ctypes

#: Field 2, wire type 2 (length-delimited): the ``chunk`` of PutRequest and GetResponse.
CHUNK_TAG = 0x12
#: A varint holds 7 bits a byte: 10 bytes cover any 64-bit length.
_MAX_VARINT = 10


def varint(value: int) -> bytes:
    """``value`` as a protobuf varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_chunk(data: memoryview) -> bytes:
    """The chunk message carrying ``data`` (bytes, as gRPC sends only bytes)."""
    return b"".join((bytes((CHUNK_TAG,)), varint(data.nbytes), data))


def chunk_payload(message: bytes) -> memoryview | None:
    """The payload of ``message`` if it is one chunk field and nothing else, as a view
    of ``message``; None for any other message (protobuf then decodes it)."""
    if not message or message[0] != CHUNK_TAG:
        return None
    length = shift = 0
    for end in range(1, min(len(message), _MAX_VARINT + 1)):
        byte = message[end]
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            start = end + 1
            return memoryview(message)[start:] if start + length == len(message) else None
        shift += 7
    return None


_bytes_of_size = ctypes.pythonapi.PyBytes_FromStringAndSize
_bytes_of_size.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_bytes_of_size.restype = ctypes.py_object
_bytes_address = ctypes.pythonapi.PyBytes_AsString
_bytes_address.argtypes = (ctypes.py_object,)
_bytes_address.restype = ctypes.c_void_p
_writable_view = ctypes.pythonapi.PyMemoryView_FromMemory
_writable_view.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
_writable_view.restype = ctypes.py_object
_PYBUF_WRITE = 0x200


def unfilled_bytes(size: int) -> tuple[bytes, memoryview]:
    """A new ``bytes`` of ``size`` bytes, not yet filled, and a writable view of it.

    Values are handed out as bytes, which Python cannot preallocate: ``bytearray(size)``
    would zero every page first, and ``bytes(bytearray)`` copy the whole value again.
    This is what C code does with ``PyBytes_FromStringAndSize(NULL, size)``: the object
    is filled through the view before anyone else sees it. Its pages are taken as they
    are written. Hand the bytes out only once every byte is written, and release the
    view first; the view does not keep the bytes alive, so keep both.
    """
    value: bytes = _bytes_of_size(None, size)
    if size == 0:  # the shared empty bytes: nothing to write
        return value, memoryview(bytearray())
    view: memoryview = _writable_view(_bytes_address(value), size, _PYBUF_WRITE)
    return value, view
