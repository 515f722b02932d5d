"""FID and KID with the TF-Inception 2015-12-05 pool3 network, computed across ranks.

Typical in-training use (every rank calls every function; all return the same on every rank):

    net = load_inception(device=device)                      # once; see inception.py for the order
    ref = dataset_stats(cfg.data.shards, network=net, num_samples=n, keep_features=True)  # cached
    gen = generator_stats(sample_fn, n, batch, network=net, seed=seed, keep_features=True)
    record = compare_on_rank0(gen, ref)   # fid, kid, n_a, n_b, network_sha256, resize, ...

`rgan fid A B` is `cli.fid_between`. Stacked-Digits mode coverage (`modes`, `modes_kl`) lives in
`rgan_dist.metrics.modes` (no Inception: a scikit-learn digit classifier per channel); `rgan modes SRC` is
`cli.modes_of`. The metrics `eval.metrics` may list are `evaluator.METRICS`.
"""

from rgan_dist.metrics.features import (
    ImageSource,
    batch_seed,
    broadcast_from_rank0,
    compare_on_rank0,
    compute_dataset_features,
    compute_generator_features,
    dataset_stats,
    gather_rows,
    generator_stats,
    network_meta,
    open_source,
    rank_world,
    share,
    stats_cache_name,
)
from rgan_dist.metrics.fid import FeatureStats, compare_stats, frechet_distance, kid
from rgan_dist.metrics.inception import (
    ENV_VAR,
    RESIZE_METHOD,
    RESOLUTION,
    InceptionInfo,
    InceptionNetwork,
    WeightsLocation,
    file_sha256,
    load_inception,
    resolve_inception,
    tf1_bilinear_resize,
)

__all__ = [
    "ENV_VAR",
    "RESIZE_METHOD",
    "RESOLUTION",
    "FeatureStats",
    "ImageSource",
    "InceptionInfo",
    "InceptionNetwork",
    "WeightsLocation",
    "batch_seed",
    "broadcast_from_rank0",
    "compare_on_rank0",
    "compare_stats",
    "compute_dataset_features",
    "compute_generator_features",
    "dataset_stats",
    "file_sha256",
    "frechet_distance",
    "gather_rows",
    "generator_stats",
    "kid",
    "load_inception",
    "network_meta",
    "open_source",
    "rank_world",
    "resolve_inception",
    "share",
    "stats_cache_name",
    "tf1_bilinear_resize",
]
