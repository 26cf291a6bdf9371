"""Remote shards: fetched (pipe: and file: URLs here, see test_fetch for http and time limits), verified,
then local; a fetch never replaces a file it did not write."""

from __future__ import annotations

import json

import pytest

from distvit.data.manifest import read_manifest
from distvit.data.prepare.synthetic import prepare_synthetic
from distvit.data.read.memory import load_split
from distvit.data.read.remote import RECORD_NAME, fetch_dataset
from distvit.errors import DataError
from tests.support.helpers import run_cli
from tests.support.shard_sets import relabelled


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch, tmp_path):
    monkeypatch.setattr("distvit.data.read.fetch.BACKOFF_S", 0.01)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # this test's own record of verified shards


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
    assert not list(local.glob("*.tmp")) and not list(local.glob("*.part"))


def test_corrupted_or_missing_remote_shard_is_refused(remote, tmp_path):
    shard = remote / "train-00002.tar"
    payload = bytearray(shard.read_bytes())
    payload[1000] ^= 1
    shard.write_bytes(bytes(payload))
    with pytest.raises(DataError, match="train-00002.tar does not match the sha256 in the manifest"):
        fetch_dataset(f"pipe:cat {remote}/{{name}}", tmp_path / "cache", ["train"], "sha256")
    assert not (tmp_path / "cache" / "train-00002.tar").exists()
    shard.unlink()
    with pytest.raises(DataError) as caught:
        fetch_dataset(f"pipe:cat {remote}/{{name}}", tmp_path / "cache", ["train"], "sha256")
    assert str(caught.value) == (
        f"could not fetch shard train-00002.tar from pipe:cat {remote}/train-00002.tar (4 tries, each: exit status 1 "
        f"(cat: {remote}/train-00002.tar: No such file or directory)). Check the command and the credentials of its "
        "tool."
    )


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
    raw = json.loads((remote / "manifest.json").read_text())
    raw["splits"]["train"]["shards"][0]["name"] = "a.tar; touch {0}; #".format(tmp_path / "PWNED")
    (remote / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="is not a plain NAME.tar file name"):
        fetch_dataset(f"pipe:cat {remote}/{{name}}", tmp_path / "cache", ["train"], "sha256")
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "cache" / "manifest.json").exists()
    with pytest.raises(DataError, match="is damaged or from an incompatible tool"):
        fetch_dataset("pipe:echo not-json #{name}", tmp_path / "cache", ["train"], "sha256")
    assert not (tmp_path / "cache" / "manifest.json").exists()  # a later, fixed data.remote fetches again
    with pytest.raises(DataError, match="distvit fetches http://, https://, file:// and pipe: URLs"):
        fetch_dataset("s3://bucket/ds/{name}", tmp_path / "cache", ["train"], "sha256")


# --- a fetch never replaces a file it did not write (issue 21, finding 13) ---


def test_a_users_file_under_a_shards_name_is_refused_not_replaced(remote, tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    (local / "train-00001.tar").write_bytes(b"the user's own train-00001.tar")
    with pytest.raises(DataError) as caught:
        fetch_dataset(f"pipe:cat {remote}/{{name}}", local, ["train"], "sha256")
    assert str(caught.value).startswith(
        f"data.path='{local}' holds 1 file(s) under the name of a shard of the manifest that do not match it and "
        "that distvit did not fetch (train-00001.tar: 30 bytes, the manifest says"
    )
    assert "move them away" in str(caught.value)
    assert (local / "train-00001.tar").read_bytes() == b"the user's own train-00001.tar"
    (local / "train-00001.tar").rename(tmp_path / "moved.tar")
    assert "train-00001.tar" in fetch_dataset(f"pipe:cat {remote}/{{name}}", local, ["train"], "sha256")


def test_a_users_file_that_matches_the_manifest_is_used_as_it_is(remote, tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    (local / "train-00000.tar").write_bytes((remote / "train-00000.tar").read_bytes())
    before = (local / "train-00000.tar").stat()
    fetched = fetch_dataset(f"pipe:cat {remote}/{{name}}", local, ["train"], "sha256")
    assert "train-00000.tar" not in fetched and (local / "train-00000.tar").stat().st_ino == before.st_ino


def test_files_the_fetch_wrote_are_replaced_for_a_new_manifest_unless_changed_since(remote, tmp_path):
    """The dataset prepared again at the remote (same names, other labels) and its new manifest fetched:
    the shards the fetch wrote (unchanged since) are replaced; one rewritten by someone since is refused."""
    local = tmp_path / "local"
    fetch_dataset(f"pipe:cat {remote}/{{name}}", local, ["train"], "sha256")
    record = json.loads((local / RECORD_NAME).read_text())
    assert sorted(record["files"]) == ["manifest.json", "train-00000.tar", "train-00001.tar", "train-00002.tar"]
    again = tmp_path / "again"
    relabelled(remote, again, shift=1)
    (local / "manifest.json").unlink()  # the new manifest is fetched
    (local / "train-00002.tar").write_bytes(b"someone else's")
    with pytest.raises(DataError, match=r"holds 1 file\(s\) .* \(train-00002.tar: 14 bytes, the manifest says"):
        fetch_dataset(f"pipe:cat {again}/{{name}}", local, ["train"], "sha256")
    assert (local / "train-00002.tar").read_bytes() == b"someone else's"
    (local / "train-00002.tar").unlink()
    fetched = fetch_dataset(f"pipe:cat {again}/{{name}}", local, ["train"], "sha256")
    assert fetched == ["train-00000.tar", "train-00001.tar", "train-00002.tar"]
    for name in fetched:
        assert (local / name).read_bytes() == (again / name).read_bytes()


def test_temporary_files_the_fetch_did_not_record_are_never_deleted(remote, tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    (local / "train-00000.tar.part").write_bytes(b"someone's")
    with pytest.raises(DataError, match="holds train-00000.tar.part, which distvit did not write"):
        fetch_dataset(f"pipe:cat {remote}/{{name}}", local, ["train"], "sha256")
    assert (local / "train-00000.tar.part").read_bytes() == b"someone's"
    (local / "train-00000.tar.part").unlink()
    # a fetch killed midway: its temporary file was recorded before it was created, so the next one removes it
    record = json.loads((local / RECORD_NAME).read_text())
    (local / "train-00001.tar.part").write_bytes(b"half a shard")
    record["partial"] = ["train-00001.tar.part"]
    (local / RECORD_NAME).write_text(json.dumps(record))
    fetch_dataset(f"pipe:cat {remote}/{{name}}", local, ["train"], "sha256")
    assert not list(local.glob("*.part"))


def test_a_user_file_named_like_the_lock_is_not_emptied(remote, tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    (local / ".fetch.lock").write_text("keep me")
    fetch_dataset(f"pipe:cat {remote}/{{name}}", local, ["train"], "size")
    assert (local / ".fetch.lock").read_text() == "keep me"


def test_the_ranks_of_a_node_fetch_the_manifest_one_at_a_time(remote, tmp_path):
    """Every local rank asks for the manifest (streaming through a cache): one fetches, the others wait
    and find it (found by the property test of resumes: two ranks wrote the fetch record's temporary file
    at once, and one rename failed with a raw FileNotFoundError)."""
    from concurrent.futures import ThreadPoolExecutor

    from distvit.data.read.remote import fetch_manifest

    slow = f"pipe:sleep 0.3; cat {remote}/{{name}}"  # both ranks are inside the fetch at the same time
    with ThreadPoolExecutor(4) as pool:
        fetched = list(pool.map(lambda _: fetch_manifest(slow, tmp_path / "local"), range(4)))
    assert sorted(fetched) == [False, False, False, True]
    assert read_manifest(tmp_path / "local") == read_manifest(remote)
    assert json.loads((tmp_path / "local" / RECORD_NAME).read_text())["partial"] == []
