"""Remote shards: fetched through webdataset's gopen (pipe: and file: URLs here), verified, then local."""

from __future__ import annotations

import pytest

from distvit.data.manifest import read_manifest
from distvit.data.memory import load_split
from distvit.data.remote import fetch_dataset
from distvit.data.synthetic import prepare_synthetic
from distvit.errors import DataError
from tests.support.helpers import run_cli


@pytest.fixture()
def remote(tmp_path):
    prepare_synthetic(tmp_path / "bucket", train_size=60, test_size=20, samples_per_shard=25)
    return tmp_path / "bucket"


def test_pipe_template_fetches_manifest_and_shards(remote, tmp_path):
    local = tmp_path / "cache"
    fetched = fetch_dataset(f"pipe:cat {remote}/{{name}}", local, ["train", "test"], "sha256")
    assert fetched == ["manifest.json", "train-00000.tar", "train-00001.tar", "train-00002.tar", "test-00000.tar"]
    assert read_manifest(local) == read_manifest(remote)
    assert len(load_split(local, read_manifest(local), "train")) == 60
    assert fetch_dataset(f"pipe:cat {remote}/{{name}}", local, ["train", "test"], "sha256") == []  # all in place
    (local / "train-00001.tar").unlink()
    assert fetch_dataset(f"{remote.as_uri()}/", local, ["train"], "size") == ["train-00001.tar"]  # prefix form
    assert not list(local.glob("*.tmp"))


def test_corrupted_or_missing_remote_shard_is_refused(remote, tmp_path):
    shard = remote / "train-00002.tar"
    payload = bytearray(shard.read_bytes())
    payload[1000] ^= 1
    shard.write_bytes(bytes(payload))
    with pytest.raises(DataError, match="train-00002.tar does not match the sha256 in the manifest"):
        fetch_dataset(f"pipe:cat {remote}/{{name}}", tmp_path / "cache", ["train"], "sha256")
    assert not (tmp_path / "cache" / "train-00002.tar").exists()
    shard.unlink()
    with pytest.raises(DataError, match="could not fetch pipe:cat .*train-00002.tar"):
        fetch_dataset(f"pipe:cat {remote}/{{name}}", tmp_path / "cache", ["train"], "sha256")


def test_config_command_fetches_before_any_rank(remote, tmp_path):
    result = run_cli(
        [
            "config",
            "--config",
            "configs/demo.yaml",
            f"data.path={tmp_path}/cache",
            f"data.remote=pipe:cat {remote}/{{name}}",
            f"run.dir={tmp_path}/run",
            "train.batch_size=30",  # the remote dataset has 60 training images
        ]
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cache" / "test-00000.tar").is_file()


def test_hostile_or_wrong_manifest_is_refused_and_not_kept(remote, tmp_path):
    import json

    raw = json.loads((remote / "manifest.json").read_text())
    raw["splits"]["train"]["shards"][0]["name"] = "a.tar; touch {0}; #".format(tmp_path / "PWNED")
    (remote / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="is not a plain NAME.tar file name"):
        fetch_dataset(f"pipe:cat {remote}/{{name}}", tmp_path / "cache", ["train"], "sha256")
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "cache" / "manifest.json").exists()
    with pytest.raises(DataError, match="is damaged or from an incompatible tool"):
        fetch_dataset("pipe:echo not-json #{name}", tmp_path / "cache", ["train"], "sha256")
    assert not (tmp_path / "cache" / "manifest.json").exists()  # a later, fixed data.remote fetches again
    with pytest.raises(DataError, match="data.remote must be an http"):
        fetch_dataset("s3://bucket/ds/{name}", tmp_path / "cache", ["train"], "sha256")
