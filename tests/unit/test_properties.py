"""Property-based tests (hypothesis) of the parsers that read what users and files hand distvit: random
text and structures give a valid result or one distvit error, never another exception."""

from __future__ import annotations

import io
import json
import tarfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distvit.config import load_config
from distvit.config.loading import parse_overrides
from distvit.data.manifest import FORMAT_NAME, FORMAT_VERSION, Manifest, ShardInfo, parse_manifest
from distvit.data.read.loader import index_shards
from distvit.errors import ConfigError, DataError

KEYS = ["train.epochs", "train.batch_size", "optim.lr", "optim.betas", "augment.preset", "run.dir", "model.pretrained"]
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
overrides = st.one_of(
    texts,  # anything at all
    st.builds(lambda key, value: f"{key}={value}", st.sampled_from(KEYS) | texts, texts),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(overrides, max_size=4))
def test_command_line_overrides_parse_or_are_a_config_error(items):
    try:
        parsed = parse_overrides(items)
    except ConfigError:
        return
    assert isinstance(parsed, dict) and all(isinstance(body, dict) for body in parsed.values())
    try:
        cfg = load_config(None, items, check_data=False)
    except ConfigError:
        return
    assert cfg.train.epochs >= 1 and isinstance(cfg.train.epochs, int) and not isinstance(cfg.train.epochs, bool)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=20,
)


def _manifest_like(draw_splits, classes, image_size, channels):
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dataset": "x",
        "classes": classes,
        "image_size": image_size,
        "channels": channels,
        "splits": draw_splits,
        "source": {},
    }


shard = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["train-00000.tar", "a.tar", "../x.tar", "x", "t.tar; rm -rf /"]) | texts,
        "num_samples": json_values,
        "num_bytes": json_values,
        "sha256": json_values,
        "label_counts": json_values,
    }
)
splits = st.dictionaries(
    st.sampled_from(["train", "test", "val"]),
    st.fixed_dictionaries({"name": texts, "num_samples": json_values, "shards": st.lists(shard, max_size=3)}),
    max_size=3,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda value: json.dumps(value).encode()),
        st.builds(_manifest_like, splits, st.lists(texts, max_size=4) | json_values, json_values, json_values).map(
            lambda value: json.dumps(value).encode()
        ),
    )
)
def test_manifest_bytes_parse_or_are_a_data_error(payload):
    try:
        manifest = parse_manifest(payload, "manifest.json")
    except DataError:
        return
    assert isinstance(manifest, Manifest) and len(set(manifest.classes)) == len(manifest.classes)
    for split in manifest.splits.values():
        assert all(isinstance(s, ShardInfo) and ".." not in s.name for s in split.shards)


def _tar_with(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


member_names = st.sampled_from(["s0.png", "s0.cls", "s1.jpg", "s1.cls", "s2.png", "noext", ".cls"]) | texts.filter(
    lambda name: name and "\x00" not in name
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.binary(max_size=600),
        st.lists(
            st.tuples(member_names, st.binary(max_size=8) | st.sampled_from([b"3", b"-1", b"12", b"x"])), max_size=5
        ).map(_tar_with),
    ),
    st.integers(0, 4),
)
def test_a_shard_index_is_built_or_is_a_data_error(tmp_path_factory, payload, claimed):
    folder = tmp_path_factory.mktemp("shard")
    (folder / "train-00000.tar").write_bytes(payload)
    manifest = Manifest(
        dataset="x",
        classes=[str(i) for i in range(10)],
        image_size=(32, 32),
        channels=3,
        splits={
            "train": parse_manifest(
                json.dumps(
                    _manifest_like(
                        {
                            "train": {
                                "name": "train",
                                "num_samples": claimed,
                                "shards": [
                                    {
                                        "name": "train-00000.tar",
                                        "num_samples": claimed,
                                        "num_bytes": len(payload),
                                        "sha256": "0" * 64,
                                        "label_counts": [0] * 10,
                                    }
                                ],
                            }
                        },
                        [str(i) for i in range(10)],
                        [32, 32],
                        3,
                    )
                ).encode(),
                "m",
            ).splits["train"]
        },
        source={},
    )
    try:
        paths, locations = index_shards(folder, manifest, "train")
    except DataError:
        return
    assert len(locations) == claimed and all(0 <= loc.label < 10 for loc in locations)
