"""Shard writer: every troublesome real-world input, exact counts, determinism, and the CLI contract."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.cli import add_shards_arguments, parse_color, parse_size, run_shards
from data_pipeline.errors import DataError
from data_pipeline.writer import write_shards

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)
R = 32


def _save(path: Path, im: Image.Image, fmt: str, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, fmt, **kw)


def _bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _halves(top: tuple, bottom: tuple, size: int = 48) -> Image.Image:
    im = Image.new("RGB", (size, size), bottom)
    im.paste(top, (0, 0, size, size // 2))
    return im


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> dict:
    """A folder, a zip and a tar holding every case the issue lists; returns paths and expected counts."""
    root = tmp_path_factory.mktemp("messy")
    src = root / "photos"
    # RGBA: left half fully transparent red, right half opaque blue.
    rgba = Image.new("RGBA", (48, 48), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (24, 0, 48, 48))
    _save(src / "rgba.png", rgba, "PNG")
    _save(src / "la.png", Image.new("LA", (48, 48), (100, 128)), "PNG")
    _save(src / "gray.jpg", Image.new("L", (60, 40), 90), "JPEG")
    pal = Image.new("P", (48, 48), 1)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.paste(0, (0, 0, 48, 24))  # top half = index 0 = transparent
    _save(src / "palette.png", pal, "PNG", transparency=0)
    _save(src / "cmyk.jpg", Image.new("CMYK", (48, 48), (0, 255, 255, 0)), "JPEG", quality=95)
    _save(src / "gray16.png", Image.fromarray(np.full((48, 48), 32896, dtype=np.uint16)), "PNG")  # 128 * 257
    _save(src / "photo.webp", Image.new("RGB", (50, 50), (10, 200, 30)), "WEBP", quality=90)
    frames = [Image.new("RGB", (40, 40), RED), Image.new("RGB", (40, 40), GREEN)]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored top row is displayed on the right
    _save(src / "exif_rotated.jpg", _halves(RED, BLUE), "JPEG", quality=95, exif=exif.tobytes())
    _save(src / "mode1.bmp", Image.new("1", (40, 40), 1), "BMP")
    _save(src / "tiny.png", Image.new("RGB", (4, 4), (1, 2, 3)), "PNG")  # must be enlarged
    _save(src / "a" / "same.png", Image.new("RGB", (40, 40), (50, 50, 50)), "PNG")
    _save(src / "b" / "same.png", Image.new("RGB", (40, 40), (60, 60, 60)), "PNG")
    _save(src / "sub dir" / "ünï cödé.photo.v2.jpg", Image.new("RGB", (40, 40), (70, 80, 90)), "JPEG")
    good_jpeg = _bytes(Image.new("RGB", (64, 64), (5, 6, 7)), "JPEG")
    (src / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (src / "empty.png").write_bytes(b"")
    (src / "not_an_image.jpg").write_text("this is text, not a JPEG")
    png = bytearray(_bytes(Image.new("RGB", (40, 40), (9, 9, 9)), "PNG"))
    i = png.find(b"IDAT")
    png[i + 4 + int.from_bytes(png[i - 4 : i], "big")] ^= 0xFF  # wrong CRC, data intact
    (src / "bad_crc.png").write_bytes(bytes(png))
    (src / "notes.txt").write_text("ignored")

    zpath = root / "more.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("z/one.jpg", _bytes(Image.new("RGB", (40, 40), (11, 12, 13)), "JPEG"))
        zf.writestr("z/two.png", _bytes(Image.new("RGB", (40, 40), (14, 15, 16)), "PNG"))
        zf.writestr("z/broken.png", _bytes(Image.new("RGB", (40, 40), (17, 18, 19)), "PNG"))
        zf.writestr("readme.md", "ignored")
    raw = bytearray(zpath.read_bytes())
    member = _bytes(Image.new("RGB", (40, 40), (17, 18, 19)), "PNG")
    at = raw.find(member)
    raw[at + len(member) // 2] ^= 0xFF  # stored data no longer matches the zip's CRC-32
    zpath.write_bytes(bytes(raw))

    tpath = root / "more.tar"
    with tarfile.open(tpath, "w") as tf:
        for name, data in [
            ("t/one.png", _bytes(Image.new("RGB", (40, 40), (21, 22, 23)), "PNG")),
            ("t/two.jpg", _bytes(Image.new("RGB", (40, 40), (24, 25, 26)), "JPEG")),
            ("t/table.csv", b"a,b\n"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return {
        "sources": [str(src), str(zpath), str(tpath)],
        "kept": 14 + 2 + 2,
        "skipped": {
            f"{src}/truncated.jpg",
            f"{src}/empty.png",
            f"{src}/not_an_image.jpg",
            f"{src}/bad_crc.png",
            f"{zpath}/z/broken.png",
        },
        "ignored": 3,
    }


def read_set(out: Path) -> tuple[dict, list[tuple[str, np.ndarray, dict]]]:
    """Manifest plus (key, pixels, meta) of every sample, in shard order, read with plain tarfile."""
    manifest = json.loads((out / "manifest.json").read_text())
    samples = []
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["url"]) as tf:
            files: dict[str, dict[str, bytes]] = {}
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                files.setdefault(key, {})[ext] = tf.extractfile(m).read()
        for key, f in files.items():
            img = Image.open(io.BytesIO(f[manifest["format"]]))
            samples.append((key, np.asarray(img), json.loads(f["json"]), img.mode))
    return manifest, samples


def by_path(samples) -> dict[str, np.ndarray]:
    return {meta["path"]: px for _, px, meta, _ in samples}


def test_every_troublesome_input(messy, tmp_path):
    out = tmp_path / "shards"
    m = write_shards(messy["sources"], out, R, fmt="png", shard_size=7)
    manifest, samples = read_set(out)
    assert manifest == m
    assert m["num_samples"] == messy["kept"] == len(samples)
    assert {s["path"] for s in m["skipped"]} == messy["skipped"]
    assert all(s["reason"] for s in m["skipped"])
    reasons = {Path(s["path"]).name: s["reason"] for s in m["skipped"]}
    assert reasons["empty.png"] == "empty file"
    assert "not an image" in reasons["not_an_image.jpg"]
    assert "CRC" in reasons["broken.png"] or "crc" in reasons["broken.png"].lower()
    assert m["ignored"] == messy["ignored"]
    assert [s["num_samples"] for s in m["shards"]] == [7, 7, 4]
    assert m["resolution"] == R and m["format"] == "png"

    keys = [k for k, *_ in samples]
    assert len(set(keys)) == len(keys) and all(k.isdigit() for k in keys)
    for _, px, _, mode in samples:
        assert mode == "RGB" and px.shape == (R, R, 3)
    paths = by_path(samples)
    assert {"a/same.png", "b/same.png", "sub dir/ünï cödé.photo.v2.jpg", "z/one.jpg", "t/two.jpg"} <= set(paths)
    assert paths["a/same.png"][0, 0].tolist() == [50, 50, 50] and paths["b/same.png"][0, 0].tolist() == [60, 60, 60]

    # Transparency composited on the white background; grey+alpha blended; palette transparency honoured.
    rgba = paths["rgba.png"]
    assert rgba[R // 2, 2].tolist() == [255, 255, 255] and rgba[R // 2, R - 3].tolist() == [0, 0, 255]
    assert abs(int(paths["la.png"][5, 5, 0]) - round(100 * 128 / 255 + 255 * 127 / 255)) <= 1
    assert paths["palette.png"][2, R // 2].tolist() == [255, 255, 255]
    assert paths["palette.png"][R - 3, R // 2].tolist() == [200, 10, 10]
    assert paths["gray16.png"][5, 5].tolist() == [128, 128, 128]  # scaled, not clipped to 255
    cmyk = paths["cmyk.jpg"][5, 5]
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60
    assert paths["anim.gif"][5, 5].tolist() == list(RED)  # first frame
    assert paths["mode1.bmp"][5, 5].tolist() == [255, 255, 255]
    # EXIF orientation 6 applied: the stored top (red) half ends up on the right.
    ex = paths["exif_rotated.jpg"].astype(int)
    assert ex[R // 2, R - 4, 0] > 200 and ex[R // 2, R - 4, 2] < 60
    assert ex[R // 2, 3, 2] > 200 and ex[R // 2, 3, 0] < 60
    meta = {meta["path"]: meta for _, _, meta, _ in samples}
    assert meta["tiny.png"]["upscaled"] and meta["tiny.png"]["orig_size"] == [4, 4]
    assert meta["exif_rotated.jpg"]["orig_size"] == [48, 48]
    assert meta["z/one.jpg"]["source"] == messy["sources"][1]
    assert m["upscaled"] == sum(x["upscaled"] for x in meta.values()) >= 1
    for shard in m["shards"]:
        data = (out / shard["url"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]


def test_worker_count_does_not_change_output(messy, tmp_path):
    m1 = write_shards(messy["sources"], tmp_path / "w1", R, shard_size=5, workers=1)
    m2 = write_shards(messy["sources"], tmp_path / "w2", R, shard_size=5, workers=2)
    assert m1 == m2 and len(m1["shards"]) == 4
    for s in m1["shards"]:
        assert (tmp_path / "w1" / s["url"]).read_bytes() == (tmp_path / "w2" / s["url"]).read_bytes()


def test_fit_modes_and_byte_cap(messy, tmp_path):
    src = tmp_path / "wide"
    _save(src / "wide.png", _halves(RED, BLUE, 64).resize((64, 32)), "PNG")
    pad = write_shards([str(src)], tmp_path / "pad", 16, fmt="png", fit="pad", background=(0, 255, 0))
    _, [(_, px, _, _)] = read_set(tmp_path / "pad")
    assert px[0, 8].tolist() == [0, 255, 0] and px[8, 8].tolist() != [0, 255, 0]  # letterboxed
    assert pad["upscaled"] == 0
    stretch = write_shards([str(src)], tmp_path / "stretch", 16, fmt="png", fit="stretch")
    _, [(_, px, _, _)] = read_set(tmp_path / "stretch")
    assert px[1, 8, 0] > 200 and px[14, 8, 2] > 200 and stretch["num_samples"] == 1

    cap = 2 * 10240
    m = write_shards(messy["sources"], tmp_path / "cap", 64, fmt="png", max_shard_bytes=cap, shuffle=False)
    sizes = [(tmp_path / "cap" / s["url"]).stat().st_size for s in m["shards"]]
    assert len(sizes) > 1 and max(sizes) <= cap
    assert sum(s["num_samples"] for s in m["shards"]) == messy["kept"]


def test_shards_readable_by_webdataset_and_tar(messy, tmp_path):
    import webdataset as wds

    out = tmp_path / "s"
    m = write_shards(messy["sources"], out, R, shard_size=6)
    urls = [str(out / s["url"]) for s in m["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("jpg", "json")
    got = list(ds)
    assert len(got) == m["num_samples"]
    assert all(img.shape == (R, R, 3) for img, _ in got)
    assert len({meta["path"] + meta["source"] for _, meta in got}) == len(got)
    listing = subprocess.run(["tar", "-tf", urls[0]], capture_output=True, text=True, check=True).stdout.split()
    assert len(listing) == 2 * m["shards"][0]["num_samples"] and listing[0].endswith(".jpg")


def test_digits_source(tmp_path):
    m = write_shards(["sklearn:digits"], tmp_path / "d", 16, fmt="png", shard_size=1000)
    assert m["num_samples"] == 1797 and [s["num_samples"] for s in m["shards"]] == [1000, 797]
    _, samples = read_set(tmp_path / "d")
    labels = {meta["label"] for _, _, meta, _ in samples}
    assert labels == set(range(10))
    px = np.stack([p for _, p, _, _ in samples[:50]])
    assert px.min() == 0 and px.max() >= 250 and (px[..., 0] == px[..., 1]).all()  # grey, full range


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_shards_arguments(parser)
    return run_shards(parser.parse_args(argv))


def test_cli_summary_overwrite_and_errors(messy, tmp_path, capsys):
    out = tmp_path / "cli"
    assert _cli([*messy["sources"], "--out", str(out), "--resolution", "16", "--no-progress"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"kept {messy['kept']}, skipped 5, ignored 3")

    with pytest.raises(DataError, match="--overwrite"):
        _cli([*messy["sources"], "--out", str(out), "--resolution", "16"])
    (out / "keep.txt").write_text("user file")
    stale = out / "data-000099.tar"
    stale.write_bytes(b"old shard")
    assert _cli([messy["sources"][2], "--out", str(out), "--resolution", "8", "--overwrite", "--no-progress"]) == 0
    assert (out / "keep.txt").exists() and not stale.exists()
    assert sorted(p.name for p in out.glob("*.tar")) == ["data-000000.tar"]
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 2

    bad = [
        (["/no/such/folder", "--out", str(tmp_path / "x"), "--resolution", "16"], "source not found"),
        ([messy["sources"][0], "--out", str(tmp_path / "x"), "--resolution", "big"], "--resolution"),
        ([messy["sources"][0], "--out", str(tmp_path / "x"), "--resolution", "1"], "resolution"),
        ([messy["sources"][0], "--out", str(tmp_path / "x"), "--resolution", "16", "--format", "gif"], "--format"),
        ([messy["sources"][0], "--out", str(tmp_path / "x"), "--resolution", "16", "--fit", "zoom"], "--fit"),
        ([messy["sources"][0], "--out", str(tmp_path / "x"), "--resolution", "16", "--quality", "0"], "quality"),
    ]
    for argv, match in bad:
        with pytest.raises(DataError, match=match) as info:
            _cli(argv)
        assert "\n" not in str(info.value)
    assert not (tmp_path / "x").exists()
    empty = tmp_path / "only_text"
    empty.mkdir()
    (empty / "a.txt").write_text("x")
    with pytest.raises(DataError, match="no image files"):
        write_shards([str(empty)], tmp_path / "y", 16)
    broken = tmp_path / "only_broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="none of the 1 images"):
        write_shards([str(broken)], tmp_path / "z", 16)
    assert not (tmp_path / "z").exists()


def test_size_and_colour_parsing():
    assert parse_size("256MiB") == 256 * 2**20 and parse_size("1GB") == 10**9 and parse_size("500k") == 500 * 1024
    assert parse_size("1234") == 1234
    assert parse_color("0,128,255") == (0, 128, 255) and parse_color("white") == (255, 255, 255)
    for bad in ("lots", "-1"):
        with pytest.raises(DataError):
            parse_size(bad)
    with pytest.raises(DataError):
        parse_color("300,0,0")
