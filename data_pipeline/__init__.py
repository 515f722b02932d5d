"""Images -> WebDataset shards (writer) and shards -> uint8 batches per rank/worker (reader).

Knows nothing about GANs: it imports nothing from the training library, and bad input is its own
`DataError`. Exports are resolved lazily so that `rgan shards` and writer worker processes never pay
for importing torch (only the reader needs it).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "DataError": "data_pipeline.errors",
    "write_shards": "data_pipeline.writer",
    "make_batch_iterator": "data_pipeline.reader",
    "BatchIterator": "data_pipeline.reader",
    "iter_images": "data_pipeline.reader",
    "load_manifest": "data_pipeline.shardset",
    "manifest_dir": "data_pipeline.shardset",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
