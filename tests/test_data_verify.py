"""Shards are checked against their manifest as they are read (issue 18: data that lies, remote errors
that say what is wrong, skipped samples that are counted).

- counts: a manifest whose counts are 10x off stops the reader with one line naming the shard;
- sha256 (data.verify): zeroed digests are caught, streamed, on local and http shards, after a resume
  mid-epoch and when shards are split between ranks and workers; `first` hashes a shard once per
  reader, `always` every epoch, `off` never; a corrupt sample does not disturb the hashing;
- remote errors: 404, 403, a refused port, s3 without a client or without credentials: one line with
  the cause and the URL;
- a shard cut short mid-file: the samples it could not deliver are counted as skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import DEMO
from jobs import JOB, job_env
from test_data_reader import http_server, make_shards, take

from data_pipeline import make_batch_iterator
from data_pipeline.errors import DataError
from data_pipeline.verify import VERIFY_MODES, iter_shard_samples

ROOT = Path(__file__).resolve().parent.parent


def with_digests(folder: Path, **change) -> Path:
    """Write the shards' real sha256 into the manifest, then apply `change` (shard index -> dict)."""
    m = json.loads((folder / "manifest.json").read_text())
    for i, s in enumerate(m["shards"]):
        s["sha256"] = hashlib.sha256((folder / s["url"]).read_bytes()).hexdigest()
        s.update(change.get(f"s{i}", {}))
    m["num_samples"] = sum(s["num_samples"] for s in m["shards"])
    (folder / "manifest.json").write_text(json.dumps(m))
    return folder


def one_epoch(spec: Path | str, **kw) -> list[list[int]]:
    kw = {"batch_size": 4, "rank": 0, "world_size": 1, "workers": 2, **kw}
    with make_batch_iterator(str(spec), **kw) as it:
        return take(it, it.batches_per_epoch + 1)  # +1: the next epoch's first batch (the last one's tail read)


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


@pytest.mark.parametrize("factor", [10, 0.1], ids=["10x-too-many", "10x-too-few"])
def test_counts_that_lie_stop_the_reader_with_one_line(tmp_path, factor):
    spec = with_digests(make_shards(tmp_path / "s", [20, 20]),
                        s0={"num_samples": int(20 * factor)}, s1={"num_samples": int(20 * factor)})
    with pytest.raises(DataError) as exc:  # through DataLoader workers: handed over, not wrapped in a traceback
        one_epoch(spec)
    assert f"does not match its manifest: 20 samples read, manifest says {int(20 * factor)}" in one_line(exc)
    assert "part-00000" in str(exc.value)


def test_zeroed_sha256_is_caught_streamed_and_off_reads_on(tmp_path):
    spec = with_digests(make_shards(tmp_path / "s", [12, 12]), s1={"sha256": "0" * 64})
    real = hashlib.sha256((spec / "part-000001.tar").read_bytes()).hexdigest()
    for mode in ("first", "always"):
        with pytest.raises(DataError) as exc:
            one_epoch(spec, verify=mode)
        assert one_line(exc).startswith(f"shard {spec / 'part-000001.tar'} does not match its manifest: ")
        assert f"sha256 {real[:12]}... read, manifest says 000000000000..." in str(exc.value)
        assert "samples read" not in str(exc.value)  # the counts are right: only what differs is named
    assert len(one_epoch(spec, verify="off")) == 7
    assert len(one_epoch(with_digests(spec), verify="always")) == 7  # the true digests pass
    with pytest.raises(DataError, match="verify='sometimes' is not one of off, first, always"):
        make_batch_iterator(str(spec), batch_size=4, rank=0, world_size=1, verify="sometimes")


@pytest.mark.parametrize(("mode", "hashed"), [("off", 0), ("first", 3), ("always", 6)])
def test_first_hashes_each_shard_once_always_every_epoch(tmp_path, monkeypatch, mode, hashed):
    import data_pipeline.verify as verify

    spec = with_digests(make_shards(tmp_path / "s", [8, 8, 8]))
    hashed_reads = []
    verdict = verify._verdict

    def counting(url, read, digest, check):
        hashed_reads.extend([url] if digest is not None else [])
        verdict(url, read, digest, check)

    monkeypatch.setattr(verify, "_verdict", counting)
    # Batch 5: 20 of the 24 samples make an epoch; with a 1-sample shuffle buffer the last shard's tail is
    # read only because the end of each epoch reads the rest of the stream's range (undecoded).
    with make_batch_iterator(str(spec), batch_size=5, rank=0, world_size=1, workers=0, shuffle_buffer=1,
                             verify=mode) as it:
        take(it, 2 * it.batches_per_epoch + 1)
    assert len(hashed_reads) == hashed and len(set(hashed_reads)) == min(hashed, 3)


def test_a_corrupt_sample_does_not_break_the_hashing(tmp_path):
    spec = with_digests(make_shards(tmp_path / "s", [10, 10], corrupt={3}))
    with make_batch_iterator(str(spec), batch_size=4, rank=0, world_size=1, workers=0, verify="always") as it:
        take(it, 2 * it.batches_per_epoch)
        assert it.skipped == 2  # once per epoch, and both shards verified twice without a word


def test_split_shards_and_resume_mid_epoch_are_verified(tmp_path):
    """2 ranks x 2 workers over 3 shards: every shard is split between streams, and the one stream whose
    range reaches a shard's end reads it from byte 0, so the check holds after a resume mid-epoch too."""
    good = with_digests(make_shards(tmp_path / "s", [12, 12, 8]))
    for rank in (0, 1):
        assert len(one_epoch(good, rank=rank, world_size=2, verify="always", start_batch=1)) == 5
    bad = with_digests(make_shards(tmp_path / "b", [12, 12, 8]), s2={"sha256": "f" * 64})
    caught = []
    for rank in (0, 1):
        try:
            one_epoch(bad, rank=rank, world_size=2, start_batch=1)
        except DataError as exc:
            caught.append(str(exc))
    assert caught and all("part-000002.tar does not match its manifest: sha256" in c for c in caught)


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset streams http with curl")
def test_remote_shards_are_verified(tmp_path):
    spec = with_digests(make_shards(tmp_path / "s", [12, 12]), s0={"sha256": "0" * 64})
    with http_server(spec) as base, pytest.raises(DataError) as exc:
        one_epoch(f"{base}/part-{{000000..000001}}.tar")
    assert one_line(exc).startswith(f"shard {base}/part-000000.tar does not match its manifest: sha256")


def test_pipe_shards_listed_in_a_manifest_are_verified(tmp_path):
    spec = with_digests(make_shards(tmp_path / "s", [12, 12]), s1={"sha256": "0" * 64})
    m = json.loads((spec / "manifest.json").read_text())
    for s in m["shards"]:
        s["url"] = f"pipe:cat {spec / s['url']}"
    (tmp_path / "pipes.json").write_text(json.dumps(m))
    with pytest.raises(DataError) as exc:
        one_epoch(tmp_path / "pipes.json")
    assert one_line(exc).startswith(f"shard pipe:cat {spec / 'part-000001.tar'} does not match its manifest: sha256")


def test_truncated_shard_counts_the_samples_it_lost(tmp_path):
    spec = with_digests(make_shards(tmp_path / "s", [12, 12]))
    tar = spec / "part-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 3])  # cut mid-file, after the manifest was written
    readable = 0
    with contextlib.suppress(Exception):
        for _ in iter_shard_samples(str(tar)):
            readable += 1
    assert 0 < readable < 12
    for workers in (0, 2):  # one stream reads the whole shard, or two streams each a part of it
        with make_batch_iterator(str(spec), batch_size=4, rank=0, world_size=1, workers=workers) as it:
            # Two epochs: a stream reads its whole range before its first batch (the shuffle buffer is larger),
            # and a count reaches the iterator with the batches consumed, so no third epoch is counted yet.
            take(it, 2 * it.batches_per_epoch)
            assert it.shard_errors >= 2
            assert it.skipped == 2 * (12 - readable)  # each epoch lost the same samples (fill-ins owe nothing)


# ---- remote errors say what is wrong ----


def _refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


@contextlib.contextmanager
def forbidding_server():
    """An http server on 127.0.0.1 that answers 403 to everything."""

    class Forbid(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            self.send_error(403, "Forbidden")

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forbid)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("client", ["curl", "urllib"])
def test_http_errors_name_the_cause_and_the_url(tmp_path, monkeypatch, client):
    if client == "urllib":
        monkeypatch.setattr("data_pipeline.shardset.shutil.which", lambda _: None)
    elif shutil.which("curl") is None:
        pytest.skip("no curl")
    spec = make_shards(tmp_path / "s", [8], manifest=False)

    def error(data: str) -> str:
        with pytest.raises(DataError) as exc:
            make_batch_iterator(data, batch_size=4, rank=0, world_size=1, workers=0)
        text = one_line(exc)
        assert "samples_per_epoch" not in text and "curl" not in text and "(['" not in text
        return text

    with http_server(spec) as base:  # shards there, no manifest beside them: 404
        text = error(f"{base}/part-000000.tar")
        assert f"cannot read manifest {base}/manifest.json: HTTP 404" in text and "cannot size an epoch" in text
        assert "put the manifest.json that `rgan shards` wrote beside the shards" in text
    with forbidding_server() as base:
        assert f"cannot read manifest {base}/manifest.json: HTTP 403 Forbidden" in error(f"{base}/part-{{0..1}}.tar")
        assert f"cannot read manifest {base}/x/manifest.json: HTTP 403" in error(f"{base}/x/manifest.json")
    port = _refused_port()
    for data in (f"http://127.0.0.1:{port}/d/part-0.tar", f"http://127.0.0.1:{port}/d/manifest.json"):
        text = error(data)
        assert text.startswith(f"cannot read manifest http://127.0.0.1:{port}/d/manifest.json: connection refused")


def test_s3_without_a_client_or_credentials_says_so(monkeypatch):
    import fsspec

    spec = "s3://bucket/d/part-{000000..000001}.tar"
    real = fsspec.get_filesystem_class

    def no_s3fs(protocol):
        if protocol == "s3":
            raise ImportError("Install s3fs to access S3")
        return real(protocol)

    with monkeypatch.context() as m:
        m.setattr(fsspec, "get_filesystem_class", no_s3fs)
        m.setattr("data_pipeline.shardset.shutil.which", lambda _: None)
        with pytest.raises(DataError) as exc:
            make_batch_iterator(spec, batch_size=4, rank=0, world_size=1)
        assert re.match(r"cannot open s3://bucket/d/part-00000[01].tar: no reader for s3://", one_line(exc))
        assert "install its fsspec backend (s3fs, gcsfs) or the aws CLI" in str(exc.value)
    s3fs = pytest.importorskip("s3fs")
    # fsspec caches a filesystem per constructor arguments, not per environment: the credential-less one made
    # here would be handed to a later test's s3:// reads in this process (tests/test_s3.py). Drop it after.
    monkeypatch.setattr(s3fs.S3FileSystem, "_cache", {})
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-profile lookup
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_refused_port()}")  # never reached: signing fails
    with pytest.raises(DataError) as exc:
        make_batch_iterator(spec, batch_size=4, rank=0, world_size=1)
    assert one_line(exc).startswith("cannot read manifest s3://bucket/d/manifest.json: no credentials found: set "
                                    "AWS_ACCESS_KEY_ID")


# ---- the config key and the CLI ----


def test_config_key_matches_the_reader_and_rejects_other_values():
    from rgan_dist.config import DATA_VERIFY, load_config
    from rgan_dist.errors import ConfigError

    assert DATA_VERIFY == VERIFY_MODES
    assert load_config(None).data.verify == "first"
    with pytest.raises(ConfigError, match="data.verify"):
        load_config(None, ["data.verify=sometimes"])


@pytest.mark.slow
def test_rgan_train_on_a_lying_manifest_is_one_line_exit_2(tmp_path):
    spec = with_digests(make_shards(tmp_path / "s", [16, 16]), s1={"num_samples": 160})
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "train", "--config", str(DEMO), *JOB, f"data.shards={spec}",
         "model.channels=3", "train.steps=3", "data.workers=2", f"run.out_dir={tmp_path / 'run'}", "eval.every=0"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=job_env(),
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "part-000001.tar does not match its manifest: 16 samples read, manifest says 160" \
        in lines[0], proc.stderr[-3000:]
