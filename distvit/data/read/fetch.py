"""Fetching one file from data.remote with time limits, a bounded number of tries and one clear error.

Sources: `http://` and `https://` (urllib, with a connect timeout and a stall timeout on every read, the
wait for the response included), `file://` URLs and plain paths (read directly), and `pipe:COMMAND` (run
by the shell; its standard output is the file; a watchdog kills it when no byte arrives for the stall
time, and a failure reports its exit status and the last line of its standard error).

A try that fails on the way (refused, no connection, stalled, cut short, a server error, a command that
failed) is tried again after a short pause, up to `FetchPolicy.retries` more times; a failure another try
cannot mend (HTTP 404, no such file, more bytes than the manifest says, another sha256) stops at once. All
tries failed: one `DataError` naming the file, the URL and what each try met. A failure to write locally
(a full disk) is never retried: its error names the file and the free space there.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import os
import re
import selectors
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from distvit.errors import DataError
from distvit.fileio import write_failure

BLOCK = 1 << 20
BACKOFF_S = 1.0
"""Pause before the second try; doubled for each further one, at most `BACKOFF_MAX_S`."""
BACKOFF_MAX_S = 8.0


@dataclass(frozen=True)
class FetchPolicy:
    """How long a fetch may wait, and how often it is tried (data.fetch_timeout_s, fetch_stall_s, fetch_retries)."""

    connect_s: float = 30.0
    """Seconds to connect to an http(s) server (TLS handshake included)."""
    stall_s: float = 60.0
    """Seconds without a byte (waiting for the answer, or in the middle of it) before a try is given up."""
    retries: int = 3
    """Further tries after a failed one."""

    def silent_s(self) -> float:
        """The longest a fetch can go without a byte and without ending in an error: every try stalling."""
        pauses = sum(min(BACKOFF_S * 2**i, BACKOFF_MAX_S) for i in range(self.retries))
        return (self.retries + 1) * (self.connect_s + self.stall_s) + pauses


class Cancelled(Exception):
    """The fetch was called off (the cache is closing)."""


class _Failed(Exception):
    """One try failed: `retry` says whether another may succeed; `kind` picks the hint of the final error."""

    def __init__(self, reason: str, kind: str, retry: bool = True):
        super().__init__(reason)
        self.kind, self.retry = kind, retry


class _LocalWrite(Exception):
    def __init__(self, path: Path, err: OSError):
        super().__init__(str(err))
        self.path, self.err = path, err


def remote_url(template: str, name: str) -> str:
    return template.replace("{name}", name) if "{name}" in template else template + name


SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def fetch_file(
    url: str,
    target: Path,
    expected_size: int | None = None,
    expected_sha256: str | None = None,
    check: Callable[[Path], None] | None = None,
    *,
    policy: FetchPolicy = FetchPolicy(),
    tmp: Path | None = None,
    what: str | None = None,
    cancel: threading.Event | None = None,
    disk_hint: str = "Free space there, or fetch to a larger disk.",
) -> None:
    """Stream `url` into `target` through `tmp` (default `<target>.part`; the caller owns that name: it is
    overwritten and removed); `check(tmp)` may refuse the content before the rename. `what` names the file
    in messages (default: the target's name); `disk_hint` ends the message of a failed local write."""
    target = Path(target)
    tmp = Path(tmp) if tmp is not None else target.with_name(target.name + ".part")
    what = what or target.name
    _check_scheme(url)
    failures: list[_Failed] = []
    digest = None
    try:
        for attempt in range(policy.retries + 1):
            if attempt:
                _pause(min(BACKOFF_S * 2 ** (attempt - 1), BACKOFF_MAX_S), cancel)
            try:
                digest = _transfer(url, tmp, expected_size, policy, cancel)
                break
            except _Failed as failure:
                failures.append(failure)
                if not failure.retry:
                    break
            except _LocalWrite as err:
                raise DataError(
                    f"fetching {what} from {url}: {write_failure(err.path, err.err)}. {disk_hint}"
                ) from None
        if digest is None:
            raise DataError(_failure_message(url, what, failures, policy))
        if expected_sha256 is not None and digest != expected_sha256:
            raise DataError(
                f"{what}: {url} does not match the sha256 in the manifest (corrupted, or changed at the source "
                "since the manifest was written)."
            )
        if check is not None:
            check(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _check_scheme(url: str) -> None:
    scheme = SCHEME.match(url)
    if scheme and scheme.group(1).lower() not in ("http", "https", "file", "pipe") and len(scheme.group(1)) > 1:
        raise DataError(
            f"data.remote: cannot fetch {url}: distvit fetches http://, https://, file:// and pipe: URLs and local "
            f"paths, not {scheme.group(1)}:. Use a command that writes the file to its standard output, e.g. "
            "'pipe:aws s3 cp s3://bucket/ds/{name} -' or 'pipe:gsutil cat gs://bucket/ds/{name}'."
        )


def _pause(seconds: float, cancel: threading.Event | None) -> None:
    if cancel is None:
        time.sleep(seconds)
    elif cancel.wait(seconds):
        raise Cancelled()


def _transfer(url: str, tmp: Path, expected_size: int | None, policy: FetchPolicy, cancel) -> str:
    """One try: the source's bytes into `tmp` (never more than `expected_size`); their sha256."""
    source = _open_source(url, policy, cancel)
    try:
        try:
            sink = open(tmp, "wb", buffering=0)
        except OSError as err:
            raise _LocalWrite(tmp, err) from None
        with sink:
            digest, size = hashlib.sha256(), 0
            while True:
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
                block = source.read(BLOCK)
                if not block:
                    break
                size += len(block)
                if expected_size is not None and size > expected_size:
                    # the rest is not written: what the cache reserved for the file is never exceeded
                    raise _Failed(f"it sends more than the manifest's {expected_size} bytes", "content", retry=False)
                digest.update(block)
                _write_all(sink, block, tmp)
            try:
                os.fsync(sink.fileno())
            except OSError as err:
                raise _LocalWrite(tmp, err) from None
        if expected_size is not None and size < expected_size:
            raise _Failed(f"the transfer ended after {size} of {expected_size} bytes", "cut")
        return digest.hexdigest()
    finally:
        source.close()


def _write_all(sink, block: bytes, path: Path) -> None:
    view = memoryview(block)
    try:
        while view:
            view = view[sink.write(view) :]
    except OSError as err:
        raise _LocalWrite(path, err) from None


def _open_source(url: str, policy: FetchPolicy, cancel: threading.Event | None = None):
    if url.startswith("pipe:"):
        return _Pipe(url[5:], policy.stall_s, cancel)
    scheme = SCHEME.match(url)
    kind = scheme.group(1).lower() if scheme and len(scheme.group(1)) > 1 else ""
    if kind in ("http", "https"):
        return _Http(url, policy)
    path = urllib.request.url2pathname(urllib.parse.urlparse(url).path) if kind == "file" else url
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise _Failed("no such file", "missing", retry=False) from None
    except (IsADirectoryError, PermissionError) as err:
        raise _Failed(err.strerror or type(err).__name__, "missing", retry=False) from None
    except OSError as err:  # a network file system's hiccup may pass
        raise _Failed(err.strerror or str(err), "io") from None


class _ConnectTimeout(OSError):
    pass


class _TimedConnection:
    """An http.client connection that connects within `connect_s` and then waits at most `stall_s` for any
    byte: the response's headers, and every read of its body."""

    def __init__(self, host, *, policy: FetchPolicy, **kwargs):
        kwargs["timeout"] = policy.connect_s
        super().__init__(host, **kwargs)
        self._policy = policy

    def connect(self):
        try:
            super().connect()
        except TimeoutError:
            raise _ConnectTimeout(f"no connection within {self._policy.connect_s:g} s") from None
        self.sock.settimeout(self._policy.stall_s)


class _TimedHTTPConnection(_TimedConnection, http.client.HTTPConnection):
    pass


class _TimedHTTPSConnection(_TimedConnection, http.client.HTTPSConnection):
    pass


class _TimedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: FetchPolicy):
        super().__init__()
        self._policy = policy

    def http_open(self, req):
        return self.do_open(functools.partial(_TimedHTTPConnection, policy=self._policy), req)


class _TimedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: FetchPolicy):
        super().__init__()
        self._policy = policy

    def https_open(self, req):
        connection = functools.partial(_TimedHTTPSConnection, policy=self._policy)
        return self.do_open(connection, req, context=self._context)


def _describe(err: BaseException) -> tuple[str, str]:
    """(reason, kind) of a network error."""
    if isinstance(err, _ConnectTimeout):
        return str(err), "connect"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused", "connect"
    if isinstance(err, socket.gaierror):
        return f"host not found ({err.strerror})", "connect"
    if isinstance(err, ConnectionError):
        return err.strerror or type(err).__name__, "cut"
    if isinstance(err, http.client.IncompleteRead):
        return f"the connection closed after {len(err.partial)} bytes of the answer", "cut"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror, "io"
    return str(err) or type(err).__name__, "io"


class _Http:
    def __init__(self, url: str, policy: FetchPolicy):
        self._policy = policy
        opener = urllib.request.build_opener(_TimedHTTPHandler(policy), _TimedHTTPSHandler(policy))
        try:
            self._response = opener.open(url)
        except urllib.error.HTTPError as err:
            err.close()
            retry = err.code >= 500 or err.code in (408, 429)
            raise _Failed(f"HTTP {err.code} {err.reason}", "server" if retry else "missing", retry) from None
        except urllib.error.URLError as err:
            reason, kind = _describe(err.reason) if isinstance(err.reason, BaseException) else (str(err.reason), "io")
            raise _Failed(reason, kind) from None
        except TimeoutError:
            raise _Failed(f"no answer within {policy.stall_s:g} s", "stall") from None
        except (OSError, http.client.HTTPException) as err:
            raise _Failed(*_describe(err)) from None

    def read(self, size: int) -> bytes:
        try:
            return self._response.read(size)
        except TimeoutError:
            raise _Failed(f"stalled (no byte for {self._policy.stall_s:g} s)", "stall") from None
        except (OSError, http.client.HTTPException) as err:
            raise _Failed(*_describe(err)) from None

    def close(self) -> None:
        self._response.close()


class _Pipe:
    """`COMMAND`'s standard output, read with a watchdog: no byte for `stall_s` kills its process group."""

    def __init__(self, command: str, stall_s: float, cancel: threading.Event | None = None):
        self._stall_s, self._cancel = stall_s, cancel
        self._process = subprocess.Popen(
            command,
            shell=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: the watchdog ends the command's children too
        )
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._process.stdout, selectors.EVENT_READ)
        self._selector.register(self._process.stderr, selectors.EVENT_READ)
        self._errors = b""
        self._done = False

    def read(self, size: int) -> bytes:
        if self._done:
            return b""
        deadline = time.monotonic() + self._stall_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._kill()
                raise _Failed(f"stalled (no byte for {self._stall_s:g} s; the command was stopped)", "stall")
            if self._cancel is not None and self._cancel.is_set():
                raise Cancelled()  # close() stops the command
            for key, _ in self._selector.select(min(left, 0.2)):  # a look at `cancel` now and then
                chunk = os.read(key.fd, size if key.fileobj is self._process.stdout else 65536)
                if key.fileobj is self._process.stderr:
                    self._errors = (self._errors + chunk)[-4096:]
                    if not chunk:
                        self._selector.unregister(key.fileobj)
                elif chunk:
                    return chunk
                else:
                    self._selector.unregister(key.fileobj)
                    self._done = True
                    self._finish()
                    return b""

    def _finish(self) -> None:
        """Standard output ended: the rest of standard error, then the exit status (within the stall time)."""
        deadline = time.monotonic() + self._stall_s
        while self._selector.get_map() and time.monotonic() < deadline:
            for key, _ in self._selector.select(max(0.0, deadline - time.monotonic())):
                chunk = os.read(key.fd, 65536)
                self._errors = (self._errors + chunk)[-4096:]
                if not chunk:
                    self._selector.unregister(key.fileobj)
        try:
            status = self._process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._kill()
            raise _Failed(f"the command did not exit within {self._stall_s:g} s of its output's end", "stall") from None
        if status:
            said = [line.strip() for line in self._errors.decode(errors="replace").splitlines() if line.strip()]
            how = f"exit status {status}" if status > 0 else f"killed by signal {-status}"
            raise _Failed(f"{how}" + (f" ({said[-1][:200]})" if said else ""), "command")

    def _kill(self) -> None:
        if self._process.poll() is None:
            try:
                os.killpg(self._process.pid, 9)
            except OSError:
                pass
        self._process.wait()

    def close(self) -> None:
        self._kill()
        self._selector.close()
        self._process.stdout.close()
        self._process.stderr.close()


HINTS = {
    "stall": "the source sent nothing for data.fetch_stall_s={stall:g} s: check it, or raise data.fetch_stall_s "
    "for a slow one",
    "connect": "check that the server is up and reachable from this node (data.fetch_timeout_s={connect:g} s to "
    "connect)",
    "cut": "the connection kept breaking: check the network, or raise data.fetch_retries",
    "server": "the server kept failing: try again later, or raise data.fetch_retries",
    "missing": "check data.remote: the file is not there, or not readable with these credentials",
    "command": "check the command and the credentials of its tool",
    "content": "the source holds another file than the manifest describes: fetch its manifest.json again",
    "io": "check data.remote and the network",
}


def _failure_message(url: str, what: str, failures: list[_Failed], policy: FetchPolicy) -> str:
    reasons = [str(f) for f in failures]
    if len(set(reasons)) == 1 and len(reasons) > 1:
        tried = f"{len(reasons)} tries, each: {reasons[0]}"
    else:
        tried = f"{len(reasons)} {'try' if len(reasons) == 1 else 'tries'}: " + "; ".join(reasons)
    hint = HINTS[failures[-1].kind].format(stall=policy.stall_s, connect=policy.connect_s)
    return f"could not fetch {what} from {url} ({tried}). {hint[0].upper()}{hint[1:]}."
