"""The sequential tar reader agrees with Python's tarfile on every header flavour, and fails loudly."""

from __future__ import annotations

import io
import tarfile

import pytest

from data_pipeline.tarstream import TarStreamError, tar_members

FILES = [
    ("plain.jpg", b"x" * 700),
    ("dir/" + "long" * 40 + ".png", b"long name"),  # > 100 chars: GNU 'L' or PAX path
    ("ünï cödé/a b.v2.json", b'{"k": 1}'),  # non-ASCII: PAX in PAX format
    ("empty.txt", b""),
    ("exact.bin", b"y" * 1024),  # a multiple of the block size: no padding
]


def make_tar(fmt: int, compression: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}", format=fmt) as tf:
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name, data in FILES:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("alias.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "plain.jpg"
        tf.addfile(link)
    return buf.getvalue()


class Trickle(io.RawIOBase):
    """A stream that returns at most 100 bytes per read, like a pipe or socket."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        n = len(self.data) - self.pos if n < 0 else min(n, 100)
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
@pytest.mark.parametrize("compression", ["", "gz"])
def test_matches_tarfile(fmt, compression):
    data = make_tar(fmt, compression)
    assert list(tar_members(Trickle(data))) == FILES  # regular files only, names and bytes intact


def test_damage_is_reported():
    data = make_tar(tarfile.GNU_FORMAT)
    with pytest.raises(TarStreamError, match="cut short"):
        list(tar_members(io.BytesIO(data[:1500])))
    bad = bytearray(data)
    bad[512 + 10] ^= 0x55  # inside the second header's name: checksum no longer matches
    with pytest.raises(TarStreamError, match="checksum"):
        list(tar_members(io.BytesIO(bytes(bad))))
    assert list(tar_members(io.BytesIO(b""))) == []
    whole = list(tar_members(io.BytesIO(data)))
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        boundary = tf.getmembers()[1].offset  # where the second member's header starts
    with pytest.raises(TarStreamError, match="cut short .at a member boundary"):  # not a shorter, valid tar
        assert list(tar_members(io.BytesIO(data[:boundary]))) == whole[:1]
