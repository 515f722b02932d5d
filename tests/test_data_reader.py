"""Training reader: equal batches per rank, disjoint data, determinism, resume, corrupt data, HTTP.

Ranks are simulated in one process: the reader takes rank/world_size as arguments (it looks them up
from torch.distributed / RANK / WORLD_SIZE only when they are not given). Every test image carries
its own index in its pixels (lossless PNG), so a batch tells exactly which samples it holds.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline import iter_images, load_manifest, make_batch_iterator, manifest_dir
from data_pipeline.errors import DataError

SIZE = 8


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (i % 256, i // 256, 77)).save(buf, "PNG")
    return buf.getvalue()


def make_shards(folder: Path, sizes: list[int], *, manifest: bool = True, corrupt: set[int] = frozenset()) -> Path:
    """Shards written by webdataset's own TarWriter (a 'foreign' writer), sample ids 0..N-1 in order."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    entries, i = [], 0
    for s, n in enumerate(sizes):
        name = f"part-{s:06d}.tar"
        with wds.TarWriter(str(folder / name)) as tw:
            for _ in range(n):
                data = b"\x89PNG garbage" if i in corrupt else _png(i)
                tw.write({"__key__": f"sample{i:05d}", "png": data, "json": json.dumps({"i": i}).encode()})
                i += 1
        entries.append({"url": name, "num_samples": n, "sha256": "", "bytes": 0})
    if manifest:
        m = {"num_samples": i, "resolution": SIZE, "format": "png", "shards": entries, "skipped": []}
        (folder / "manifest.json").write_text(json.dumps(m))
    return folder


def ids(batch: torch.Tensor) -> list[int]:
    assert batch.dtype == torch.uint8 and batch.shape[1:] == (3, SIZE, SIZE)
    px = batch[:, :, 0, 0].to(torch.int64)
    assert (batch[:, 2] == 77).all()  # whole images, not mixed
    return (px[:, 0] + 256 * px[:, 1]).tolist()


def take(it, n: int) -> list[list[int]]:
    return [ids(next(it)) for _ in range(n)]


def epoch_ids(spec, world: int, *, batch_size: int = 4, workers: int = 2, seed: int = 0, epochs: int = 1, **kw):
    """Per rank: the list of batches (as id lists) of the first `epochs` epochs; also batches_per_epoch."""
    out, bpes = [], set()
    for rank in range(world):
        with make_batch_iterator(
            str(spec), batch_size=batch_size, rank=rank, world_size=world, workers=workers, seed=seed, **kw
        ) as it:
            bpes.add(it.batches_per_epoch)
            out.append(take(it, it.batches_per_epoch * epochs))
            assert it.state()["epoch"] == epochs and it.state()["batch"] == 0
    assert len(bpes) == 1
    return out, bpes.pop()


@pytest.mark.parametrize("sizes", [[30, 30, 30], [30, 30, 30, 10, 5, 17, 3]], ids=["3-even", "7-uneven"])
def test_two_ranks_two_workers_equal_disjoint_deterministic(tmp_path, sizes):
    spec = make_shards(tmp_path / "s", sizes)
    n = sum(sizes)
    per_rank, bpe = epoch_ids(spec, 2, epochs=2)
    assert bpe == n // (4 * 2)
    with make_batch_iterator(str(spec), batch_size=4, rank=0, world_size=2, workers=2) as it:
        b = next(it)  # channels-last storage: the NHWC decode output, viewed as [B, 3, R, R]
        assert b.shape == (4, 3, SIZE, SIZE) and b.is_contiguous(memory_format=torch.channels_last)
    for rank_batches in per_rank:
        assert len(rank_batches) == 2 * bpe and all(len(b) == 4 for b in rank_batches)
    for e in range(2):
        seen = [i for r in per_rank for b in r[e * bpe : (e + 1) * bpe] for i in b]
        assert len(seen) == len(set(seen)) == bpe * 8  # disjoint across ranks and workers within an epoch
        assert set(seen) <= set(range(n))
    assert per_rank[0][:bpe] != per_rank[0][bpe:]  # a new order every epoch
    again, _ = epoch_ids(spec, 2, epochs=2)
    assert again == per_rank  # deterministic for a given seed
    other, _ = epoch_ids(spec, 2, epochs=1, seed=1)
    assert other[0] != per_rank[0][:bpe]


def test_in_process_and_tiny_sets(tmp_path):
    spec = make_shards(tmp_path / "s", [9, 9])
    (batches,), bpe = epoch_ids(spec, 1, workers=0, batch_size=3)
    flat = [i for b in batches for i in b]
    assert bpe == 6 and sorted(flat) == list(range(18))  # one rank reads the whole epoch exactly once
    # Fewer samples than one global batch: still one (resampled) batch per epoch on every rank.
    tiny = make_shards(tmp_path / "tiny", [3])
    per_rank, bpe = epoch_ids(tiny, 2, batch_size=4, workers=2)
    assert bpe == 1 and all(len(r) == 1 and len(r[0]) == 4 for r in per_rank)


def test_resume_continues_without_replay(tmp_path):
    spec = make_shards(tmp_path / "s", [30, 30, 30, 10, 5, 17, 3])
    for rank in range(2):
        kw = dict(batch_size=4, rank=rank, world_size=2, workers=2, seed=3)
        with make_batch_iterator(str(spec), **kw) as ref:
            bpe = ref.batches_per_epoch
            full = take(ref, 2 * bpe + 3)
        consumed = bpe + 5  # stop in the middle of epoch 1
        with make_batch_iterator(str(spec), **kw) as first:
            before = take(first, consumed)
            state = first.state()
        assert state["epoch"] == 1 and state["batch"] == 5 and before == full[:consumed]
        with make_batch_iterator(str(spec), start_epoch=state["epoch"], start_batch=state["batch"], **kw) as resumed:
            after = take(resumed, len(full) - consumed)
            assert resumed.state()["epoch"] == 2 and resumed.state()["batch"] == 3
        assert after == full[consumed:]
        epoch1_before = {i for b in before[bpe:] for i in b}
        epoch1_after = {i for b in after[: bpe - 5] for i in b}
        assert not epoch1_before & epoch1_after  # no image of epoch 1 replayed


def test_corrupt_sample_and_broken_shard_are_skipped_and_counted(tmp_path):
    spec = make_shards(tmp_path / "s", [16, 16], corrupt={5})
    with make_batch_iterator(str(spec), batch_size=4, rank=0, world_size=1, workers=2) as it:
        batches = take(it, it.batches_per_epoch)  # 8 batches = all 32 samples exactly once
        assert it.skipped == 1 and it.state()["skipped"] == 1
    flat = [i for b in batches for i in b]
    assert 5 not in flat and len(flat) == 32 and len(set(flat)) == 31  # the hole is filled by a repeat
    # A resumed iterator carries the count on.
    with make_batch_iterator(str(spec), batch_size=4, world_size=1, rank=0, start_epoch=1, start_skipped=1) as it:
        take(it, it.batches_per_epoch)
        assert it.skipped == 2

    broken = make_shards(tmp_path / "b", [12, 12])
    data = (broken / "part-000001.tar").read_bytes()
    (broken / "part-000001.tar").write_bytes(data[: len(data) // 3])  # truncated mid-shard
    with make_batch_iterator(str(broken), batch_size=4, rank=0, world_size=1, workers=0) as it:
        got = take(it, 2 * it.batches_per_epoch)
        assert it.shard_errors >= 1 and all(len(b) == 4 for b in got)


def test_resolution_override_and_no_manifest(tmp_path):
    spec = make_shards(tmp_path / "s", [10, 10], manifest=False)
    assert load_manifest(str(spec)) is None
    with make_batch_iterator(str(spec), batch_size=5, rank=0, world_size=1, workers=0) as it:
        assert it.batches_per_epoch == 4 and it.resolution == SIZE  # counts scanned, size probed
        assert sorted(i for b in take(it, 4) for i in b) == list(range(20))
    brace = f"{spec}/part-{{000000..000001}}.tar"
    with make_batch_iterator(brace, batch_size=5, resolution=4, rank=0, world_size=1, workers=0) as it:
        assert next(it).shape == (5, 3, 4, 4)


def test_rank_and_world_from_environment(tmp_path, monkeypatch):
    spec = make_shards(tmp_path / "s", [16])
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    from_env = take(make_batch_iterator(str(spec), batch_size=2, workers=0), 4)
    explicit = take(make_batch_iterator(str(spec), batch_size=2, rank=1, world_size=2, workers=0), 4)
    assert from_env == explicit
    with pytest.raises(DataError, match="rank 2"):
        make_batch_iterator(str(spec), batch_size=2, rank=2, world_size=2)


def test_iter_images_each_sample_once(tmp_path):
    spec = make_shards(tmp_path / "s", [7, 7, 3])
    parts = [[int(a[0, 0, 0]) for a in iter_images(str(spec), rank=r, world_size=3)] for r in range(3)]
    assert [len(p) for p in parts] == [5, 6, 6]
    assert [i for p in parts for i in p] == list(range(17))  # manifest order, each exactly once
    imgs = list(iter_images(str(spec), rank=0, world_size=1, resolution=4))
    assert len(imgs) == 17 and imgs[0].shape == (4, 4, 3) and imgs[0].dtype == np.uint8
    assert manifest_dir(str(spec)) == spec and manifest_dir(str(spec / "manifest.json")) == spec
    assert manifest_dir(f"{spec}/part-{{000000..000002}}.tar") == spec.resolve()


def test_digits_spec_materialises_once(tmp_path, monkeypatch):
    monkeypatch.setenv("RGAN_DATA_CACHE", str(tmp_path / "cache"))
    with make_batch_iterator("sklearn:digits", batch_size=16, resolution=16, rank=0, world_size=2, workers=0) as it:
        b = next(it)
        assert b.shape == (16, 3, 16, 16) and it.batches_per_epoch == 1797 // 32
    d = manifest_dir("sklearn:digits", resolution=16)
    assert d is not None and d.parent == tmp_path / "cache" and load_manifest(str(d))["num_samples"] == 1797
    assert len(list((tmp_path / "cache").iterdir())) == 1  # reused, no second copy


@contextlib.contextmanager
def http_server(root: Path):
    """`python -m http.server` bound to 127.0.0.1 on a free port, serving `root`; stopped afterwards."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("http.server did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset streams http with curl")
def test_http_streaming_matches_local(tmp_path, monkeypatch):
    spec = make_shards(tmp_path / "s", [12, 12, 8])
    local, bpe = epoch_ids(spec, 2, epochs=1)
    with http_server(spec) as base:
        brace = f"{base}/part-{{000000..000002}}.tar"
        remote, rbpe = epoch_ids(brace, 2, epochs=1)  # counts from the manifest beside the shards
        assert (remote, rbpe) == (local, bpe)
        via_manifest, _ = epoch_ids(f"{base}/manifest.json", 2, epochs=1)
        assert via_manifest == local
        assert manifest_dir(brace) is None and load_manifest(brace)["num_samples"] == 32
        streamed = [int(a[0, 0, 0]) for a in iter_images(brace, rank=0, world_size=1)]
        assert streamed == list(range(32))
        monkeypatch.setattr("data_pipeline.shardset.shutil.which", lambda _: None)  # no curl: urllib
        assert [int(a[0, 0, 0]) for a in iter_images(brace, rank=1, world_size=2)] == list(range(16, 32))
    with pytest.raises(DataError, match="no reader for foo://"):
        make_batch_iterator("foo://host/part-{000000..000002}.tar", batch_size=4, samples_per_epoch=8)


@pytest.mark.gpu
def test_pinned_batches_on_cuda(tmp_path):
    spec = make_shards(tmp_path / "s", [16, 16])
    (cpu_batches,), bpe = epoch_ids(spec, 1, workers=2)
    got = []
    with make_batch_iterator(str(spec), batch_size=4, rank=0, world_size=1, workers=2, device="cuda") as it:
        for _ in range(bpe):
            b = next(it)
            assert b.is_pinned() and b.is_contiguous(memory_format=torch.channels_last)
            got.append(ids(b.to("cuda", non_blocking=True).cpu()))
    assert got == cpu_batches  # pinning changes where a batch lives, not what it holds


def test_in_a_ray_process_workers_start_from_a_forkserver(tmp_path, monkeypatch):
    """Issue 19: a Ray worker printed abseil's "Mutex corrupt ... SIGABRT ... Fatal Python error: Aborted": DataLoader
    workers forked from a process running gRPC threads (grpc/grpc#32992). Where Ray runs in the process, the
    workers start from a forkserver, and read exactly the batches forked workers read."""
    import sys
    import types

    from data_pipeline.workers import worker_start_method

    spec = make_shards(tmp_path / "s", [30, 30])
    kw = dict(batch_size=4, rank=0, world_size=1, workers=2, seed=1)
    with make_batch_iterator(str(spec), **kw) as it:
        forked = take(it, 6)
    assert worker_start_method() in (None, "forkserver")
    fake_ray = types.SimpleNamespace(is_initialized=lambda: True)
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    assert worker_start_method() == "forkserver"
    with make_batch_iterator(str(spec), **kw) as it:
        served = take(it, 6)
        assert {type(w).__name__ for w in it._it._workers} == {"ForkServerProcess"}
    assert served == forked
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: False))
    assert worker_start_method() is None
