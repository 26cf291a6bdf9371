"""The checks every config-driven command (train, config, surgery, bench train) runs before any rank
starts: config, dataset manifest and shards, model, run directory; and the arguments those commands
share. Input errors raise `DistvitError`s that the command prints as one message."""

from __future__ import annotations

import sys
from pathlib import Path

from distvit.data.node import is_local_leader, launch
from distvit.errors import ConfigError, DataError


def add_config_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-4 train.epochs=2"
    )


def load_checked_config(config_file: str, overrides: list[str]):
    """Everything that can be checked without starting ranks: config, dataset manifest and shards (preflight),
    model, run dir."""
    from distvit.config import load_config
    from distvit.data.manifest import read_manifest
    from distvit.data.read.cache import check_cache_dir
    from distvit.data.read.remote import fetch_dataset, fetch_manifest
    from distvit.data.read.shard_checks import bad_shards_message
    from distvit.engine.sources import fetch_policy
    from distvit.model.build import check_model_config
    from distvit.run.rundir import check_run_dir
    from distvit.tools.dataset_checks import check_with_dataset

    cfg = load_config(config_file, overrides)
    splits = [cfg.data.train_split, cfg.data.eval_split]
    # One process per node hashes; the others compare sizes. Under a launcher the ranks unite their
    # findings before acting on them (engine.Trainer), so no rank fails alone while the others wait.
    verify = cfg.data.verify if is_local_leader() else "size"
    policy = fetch_policy(cfg.data)
    if cfg.data.cache_dir:  # shards are fetched and verified as training needs them (distvit.data.read.cache)
        check_cache_dir(cfg.data.cache_dir)  # every rank, before any starts: all stop together
        fetch_manifest(cfg.data.remote, Path(cfg.data.path), policy)
    elif cfg.data.remote:
        # fetching checks every local shard with the same rule and replaces the bad ones it wrote (or raises)
        fetch_dataset(cfg.data.remote, cfg.data.path, splits, verify, policy)
    manifest = read_manifest(cfg.data.path)
    for key, split in zip(("data.train_split", "data.eval_split"), splits):
        manifest.split(split, cfg.data.path, key=key)
    check_with_dataset(cfg, manifest)  # threads, memory mode, crop padding: before any shard is hashed
    bad_shards = {} if cfg.data.remote else _preflight(cfg, manifest, splits, verify)
    if bad_shards and cfg.data.bad_shards == "error" and launch().world_size == 1:
        raise DataError(bad_shards_message(cfg.data.path, bad_shards))
    train_size = manifest.split(cfg.data.train_split, cfg.data.path).num_samples
    if not manifest.split(cfg.data.eval_split, cfg.data.path).num_samples:
        others = [name for name, split in manifest.splits.items() if split.num_samples and name != cfg.data.train_split]
        raise DataError(
            f"data.eval_split={cfg.data.eval_split!r} of {cfg.data.path} holds no images: every evaluation would "
            f"count 0 of 0. Choose a split with images{' (' + ', '.join(others) + ')' if others else ''}."
        )
    if cfg.data.train_subset > train_size:
        raise ConfigError(
            f"data.train_subset={cfg.data.train_subset} is larger than split '{cfg.data.train_split}' of "
            f"{cfg.data.path} ({train_size} images); choose at most {train_size}, or 0 for all."
        )
    trained = cfg.data.train_subset or train_size
    if cfg.train.batch_size > trained:
        where = "data.train_subset" if cfg.data.train_subset else f"split {cfg.data.train_split!r} of {cfg.data.path}"
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is larger than the {trained} training images ({where}): "
            f"every step would be mostly padding. Choose a global batch of at most {trained}."
        )
    check_model_config(cfg.model, cfg.surgery, manifest.num_classes)
    check_run_dir(cfg.run, resume=cfg.train.resume)
    return cfg, manifest, bad_shards


def _preflight(cfg, manifest, splits: list[str], verify: str) -> dict[str, str]:
    """The shard checks: hashing on the node's leader (parallel, skipping shards verified before), sizes
    on the other local ranks, which wait for the leader under data.preflight_timeout_s (not
    train.timeout_s: a long hash is not a hung rank) before they go on to meet the other ranks."""
    import time

    from distvit.data.node import local_ranks
    from distvit.data.read.shard_checks import find_bad_shards, hashing_estimate, preflight_marker

    done, several = preflight_marker(), local_ranks()[1] > 1
    if not is_local_leader():
        bad = find_bad_shards(cfg.data.path, manifest, splits, "size")
        deadline = time.monotonic() + cfg.data.preflight_timeout_s
        while several and not done.exists():
            if time.monotonic() > deadline:
                raise DataError(
                    f"the first rank of this node did not finish checking the shards of {cfg.data.path} within "
                    f"data.preflight_timeout_s={cfg.data.preflight_timeout_s}: raise it, or set data.verify=size."
                )
            time.sleep(0.1)
        return bad
    try:
        if verify == "sha256":
            pending, seconds = hashing_estimate(cfg.data.path, manifest, splits)
            if seconds > 60:
                print(
                    f"distvit: note: hashing {pending / 1e9:.1f} GB of shards, about {seconds:.0f} s; shards "
                    "verified once are not hashed again while unchanged. data.verify=size checks sizes only.",
                    file=sys.stderr,
                    flush=True,
                )
        return find_bad_shards(cfg.data.path, manifest, splits, verify)
    finally:
        if several:
            done.touch()
