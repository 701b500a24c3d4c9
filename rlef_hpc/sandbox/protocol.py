"""Framing between the executor and its workers: a length, then a marshal'd dict.

marshal is the fastest serialiser for plain dicts of str/bytes/numbers and both ends are the
same interpreter; the channel is a private pipe, never exposed to solutions.
"""

from __future__ import annotations

import marshal
import os
import struct
from typing import Any

_HEADER = struct.Struct("<Q")


def write_frame(fd: int, message: dict[str, Any]) -> None:
    payload = marshal.dumps(message)
    data = memoryview(_HEADER.pack(len(payload)) + payload)
    while data:
        data = data[os.write(fd, data) :]


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> dict[str, Any] | None:
    """The next message, or None when the other end has gone."""
    header = _read_exact(fd, _HEADER.size)
    if header is None:
        return None
    payload = _read_exact(fd, _HEADER.unpack(header)[0])
    return None if payload is None else marshal.loads(payload)
