"""Our manifest is also a `wids` dataset descriptor: WebDataset's own indexed reader opens the shards that
`rgan shards` writes and yields the same samples, under the same keys, as our reader."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from data_pipeline.reader import iter_images, iter_shard_samples
from launcher.cli import main


def test_wids_reads_our_shards_as_our_reader_does(tmp_path, capsys):
    import wids

    out = tmp_path / "digits"
    assert main(["shards", "sklearn:digits", "--out", str(out), "--resolution", "16", "--format", "png",
                 "--shard-size", "700"]) == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["wids_version"] == 1
    assert [(s["url"], s["nsamples"], s["filesize"]) for s in manifest["shardlist"]] == [
        (s["url"], s["num_samples"], s["bytes"]) for s in manifest["shards"]]
    assert len(manifest["shards"]) == 3  # 1797 digits in shards of 700: uneven, as real sets are

    ds = wids.ShardListDataset(str(out / "manifest.json"), cache_dir=str(tmp_path / "wids-cache"),
                               transformations=[])
    assert len(ds) == manifest["num_samples"] == 1797
    theirs = [ds[i] for i in range(len(ds))]
    ours = [kv for s in manifest["shards"] for kv in iter_shard_samples(str(out / s["url"]))]
    assert [t["__key__"] for t in theirs] == [key for key, _ in ours]
    assert all(t[".png"].getvalue() == data for t, (_, data) in zip(theirs, ours, strict=True))
    # Decoded, they are the training reader's images.
    decoded = list(iter_images(str(out)))
    assert all(np.array_equal(np.asarray(Image.open(io.BytesIO(t[".png"].getvalue())).convert("RGB")), img)
               for t, img in zip(theirs, decoded, strict=True))
