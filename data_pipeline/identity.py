"""A shard set's identity: one digest of its content, the same wherever it is computed.

The FID protocol keys its cached reference statistics on it (`rgan_dist.metrics.features.dataset_identity`)
and every training run is tagged with it (`rgan_dist.run_info.dataset_tags`), so runs and references on the
same shards carry the same value. It lives with the shard sets, below both users, so neither reaches into
the other for it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from data_pipeline.shardset import ShardSet


def content_sha256(shards: ShardSet) -> str | None:
    """sha256 of the manifest's shard checksums, in order; for local shards without checksums, of their
    names, sizes and modification times. Rewriting shards into the same folder changes it. None when the
    content cannot be identified (remote shards without a manifest listing checksums)."""
    manifest = shards.manifest or {}
    listed = manifest.get("shards") or []
    if listed and all(isinstance(s, dict) and s.get("sha256") for s in listed):
        content = [str(s["sha256"]) for s in listed]
    elif shards.local_dir is not None and not any("://" in u or u.startswith("pipe:") for u in shards.urls):
        # local shards without checksums: name, size and modification time stand in for the content
        content = []
        for u in shards.urls:
            st = Path(u).stat()
            content.append(f"{Path(u).name}:{st.st_size}:{st.st_mtime_ns}")
    else:
        return None
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()
