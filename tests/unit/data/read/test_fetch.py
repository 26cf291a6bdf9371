"""distvit.data.read.fetch: every fetch has a connect and a stall limit, is tried a bounded number of times,
and ends in one error naming the file, the URL and what each try met (issue 21, finding 12)."""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from distvit.data.read.fetch import FetchPolicy, fetch_file
from distvit.errors import DataError
from tests.support.disks import small_tmpfs

QUICK = FetchPolicy(connect_s=2.0, stall_s=0.3, retries=2)


@pytest.fixture(autouse=True)
def _short_pauses(monkeypatch):
    monkeypatch.setattr("distvit.data.read.fetch.BACKOFF_S", 0.01)


@pytest.fixture()
def payload(tmp_path):
    data = os.urandom(300_000)
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "a.tar").write_bytes(data)
    return data


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def serve():
    """serve(handler class) -> base URL of a threaded HTTP server on loopback (stopped after the test)."""
    servers = []

    def start(handler):
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _fetch(url, target, data=None, policy=QUICK, **kwargs):
    size = len(data) if data is not None else None
    digest = hashlib.sha256(data).hexdigest() if data is not None else None
    fetch_file(url, target, size, digest, policy=policy, what="shard a.tar", **kwargs)


def test_a_served_file_arrives_whole(tmp_path, payload, serve):
    url = serve(functools.partial(_Quiet, directory=str(tmp_path / "served")))
    _fetch(f"{url}/a.tar", tmp_path / "a.tar", payload)
    assert (tmp_path / "a.tar").read_bytes() == payload and not (tmp_path / "a.tar.part").exists()


def test_a_server_that_accepts_and_never_answers_is_given_up_after_the_stall_limit(tmp_path, payload):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel accepts connections; nothing ever answers
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/a.tar"
    started = time.monotonic()
    try:
        with pytest.raises(DataError) as caught:
            _fetch(url, tmp_path / "a.tar", payload)
    finally:
        silent.close()
    assert time.monotonic() - started < 3 * 0.3 + 1.0
    assert str(caught.value) == (
        f"could not fetch shard a.tar from {url} (3 tries, each: no answer within 0.3 s). The source sent nothing "
        "for data.fetch_stall_s=0.3 s: check it, or raise data.fetch_stall_s for a slow one."
    )
    assert not (tmp_path / "a.tar").exists() and not (tmp_path / "a.tar.part").exists()


def test_a_refused_connection_is_retried_then_one_error_without_internals(tmp_path, payload):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    url = f"http://127.0.0.1:{port}/a.tar"
    with pytest.raises(DataError) as caught:
        _fetch(url, tmp_path / "a.tar", payload)
    assert str(caught.value) == (
        f"could not fetch shard a.tar from {url} (3 tries, each: connection refused). Check that the server is up "
        "and reachable from this node (data.fetch_timeout_s=2 s to connect)."
    )


def test_a_transfer_that_stalls_midway_is_given_up_and_tried_again(tmp_path, payload, serve):
    tries = []

    class HalfThenSilence(BaseHTTPRequestHandler):
        def do_GET(self):
            tries.append(1)
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            if len(tries) < 3:
                time.sleep(1.5)  # silent well past the stall limit
            else:
                self.wfile.write(payload[len(payload) // 2 :])

        def log_message(self, *args):
            pass

    url = serve(HalfThenSilence)
    _fetch(f"{url}/a.tar", tmp_path / "a.tar", payload)  # the third try gets it all
    assert len(tries) == 3 and (tmp_path / "a.tar").read_bytes() == payload
    tries.clear()
    with pytest.raises(DataError) as caught:
        _fetch(f"{url}/a.tar", tmp_path / "b.tar", payload, policy=FetchPolicy(2.0, 0.3, retries=1))
    assert "(2 tries, each: stalled (no byte for 0.3 s))" in str(caught.value)


def test_server_errors_are_retried_and_a_missing_file_is_not(tmp_path, payload, serve):
    calls = []

    class FlakyThenFine(_Quiet):
        def do_GET(self):
            calls.append(self.path)
            if self.path == "/a.tar" and len(calls) == 1:
                self.send_error(503)
            else:
                super().do_GET()

    url = serve(functools.partial(FlakyThenFine, directory=str(tmp_path / "served")))
    _fetch(f"{url}/a.tar", tmp_path / "a.tar", payload)
    assert calls == ["/a.tar", "/a.tar"] and (tmp_path / "a.tar").read_bytes() == payload
    calls.clear()
    with pytest.raises(DataError) as caught:
        _fetch(f"{url}/gone.tar", tmp_path / "gone.tar", payload)
    assert calls == ["/gone.tar"]  # not found: another try would not find it either
    assert str(caught.value) == (
        f"could not fetch shard a.tar from {url}/gone.tar (1 try: HTTP 404 File not found). Check data.remote: "
        "the file is not there, or not readable with these credentials."
    )


def test_more_bytes_than_the_manifest_says_are_never_written(tmp_path, payload, serve):
    url = serve(functools.partial(_Quiet, directory=str(tmp_path / "served")))
    with pytest.raises(DataError, match=r"\(1 try: it sends more than the manifest's 1000 bytes\)"):
        fetch_file(f"{url}/a.tar", tmp_path / "a.tar", 1000, None, policy=QUICK)
    assert not (tmp_path / "a.tar").exists() and not (tmp_path / "a.tar.part").exists()


def test_a_pipe_command_that_stalls_is_stopped_and_its_failure_reported(tmp_path):
    pid_file = tmp_path / "pid"
    with pytest.raises(DataError) as caught:
        _fetch(f"pipe:echo $$ > {pid_file}; exec sleep 30", tmp_path / "a.tar", policy=FetchPolicy(2.0, 0.3, 0))
    assert "(1 try: stalled (no byte for 0.3 s; the command was stopped))" in str(caught.value)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)  # stopped, not left sleeping
    with pytest.raises(DataError) as caught:
        _fetch("pipe:echo starting >&2; echo 'access denied: bucket' >&2; exit 3", tmp_path / "a.tar")
    assert str(caught.value) == (
        "could not fetch shard a.tar from pipe:echo starting >&2; echo 'access denied: bucket' >&2; exit 3 (3 tries, "
        "each: exit status 3 (access denied: bucket)). Check the command and the credentials of its tool."
    )


def test_a_pipe_command_that_delivers_then_fails_is_not_taken(tmp_path, payload):
    source = tmp_path / "served" / "a.tar"
    with pytest.raises(DataError, match=r"each: exit status 2\)"):
        _fetch(f"pipe:cat {source}; exit 2", tmp_path / "a.tar", payload)
    assert not (tmp_path / "a.tar").exists()
    _fetch(f"pipe:cat {source}", tmp_path / "a.tar", payload)
    assert (tmp_path / "a.tar").read_bytes() == payload


def test_local_paths_and_file_urls(tmp_path, payload):
    source = tmp_path / "served" / "a.tar"
    _fetch(str(source), tmp_path / "a.tar", payload)
    _fetch(source.as_uri(), tmp_path / "b.tar", payload)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes() == payload
    with pytest.raises(DataError, match=r"\(1 try: no such file\)"):
        _fetch(str(tmp_path / "nowhere.tar"), tmp_path / "c.tar", payload)


def test_an_unsupported_scheme_says_what_is_supported(tmp_path):
    with pytest.raises(DataError, match=r"not s3:\. Use a command .* 'pipe:aws s3 cp s3://bucket/ds/\{name\} -'"):
        _fetch("s3://bucket/ds/a.tar", tmp_path / "a.tar")


def test_a_full_local_disk_is_not_retried_and_names_the_file_and_free_space(tmp_path, payload):
    runs = tmp_path / "runs"
    source = Path(tmp_path / "big")
    source.write_bytes(os.urandom(3 << 20))
    with small_tmpfs(tmp_path / "disk", 1) as disk:
        with pytest.raises(DataError) as caught:
            fetch_file(f"pipe:echo >> {runs}; cat {source}", disk / "big", 3 << 20, None, policy=QUICK)
        assert not list(disk.iterdir())
    assert runs.read_text().count("\n") == 1  # the source was read once
    message = str(caught.value)
    assert message.startswith(f"fetching big from pipe:echo >> {runs}; cat {source}: writing {disk}/big.part failed (")
    assert "No space left on device); 0 MB free there. Free space there, or fetch to a larger disk." in message
