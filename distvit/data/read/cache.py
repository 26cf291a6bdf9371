"""Streaming from data.remote through a bounded node-local cache (`data.cache_dir`, `data.cache_limit`).

The dataset never has to fit on a node: shards are fetched as the epoch plan needs them and evicted when
no rank of the node needs them again in its current pass. Every rank publishes, at the start of each pass
over a split (a training epoch, an evaluation), which shards it needs at which of its steps, and after
each batch how far it has read. One fetcher per node (threads of local rank 0) reads those, fetches in
the order of need, as far ahead as the limit allows, and makes room by evicting shards that no local rank
still needs. A fetch is reserved against the limit before it starts.

The guarantees:

- Content, not names: a shard is cached under its name and the start of its sha256 (`NAME.<sha16>.tar`),
  its sample index beside it records the sha256 it was built from, and it is used only after the fetcher
  has vouched for it in this run: fetched and checked against the manifest's size and sha256, or found in
  the folder and matching the sha256 (hashed, or unchanged since it matched: the record of verified
  shards, see distvit.data.read.shard_checks). A dataset prepared again under the same names and sizes is never
  mistaken for the old one; a reader never opens a file the fetcher has not vouched for.
- The limit holds for the whole folder: every byte in it counts (shards, indexes, fetches under way, the
  cache's own bookkeeping, leftovers of other datasets); leftovers go first when room is needed.
- Nothing lost: the cache deletes only names it recorded (in its ledger, before creating them), and a
  folder that holds anything else is refused.
- Failures reach every reader at once: the fetcher's error goes into a file it allocated when it started
  (written in place: a full disk cannot refuse it), which readers poll while they wait.

Files in the cache folder:

    .distvit-cache             the mark, and the lock the node's fetcher holds (pid and host inside)
    .distvit-ledger            the names the cache created and has not deleted (written before each creation)
    NAME.SHA16.tar, .tar.idx   a verified shard and its sample index (kept across runs: a requeue reuses them)
    NAME.SHA16.tar.part        a fetch under way (a killed one's is removed by the next run)
    session-ID/                this launch's (ID: the launcher): `error` (the fetcher's failure, pre-allocated),
                               `ok-FILE` (the fetcher vouches for FILE), each local rank's `needs-R.json`
                               and `step-R` (its needs and position in the current pass)

The epoch order is the plan's (distvit.data.plan), so exactly-once, equal steps and exact resume hold as
with local shards; `data.shuffle=window` makes the order one that a small cache can serve. What every
pass of the run needs at once is checked before the first step (`ShardCache.check_passes`).
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distvit.data.manifest import ShardInfo, sha256_file
from distvit.data.node import local_ranks, session_id
from distvit.data.read.fetch import Cancelled, FetchPolicy, fetch_file, remote_url
from distvit.data.read.shard_checks import _recorded, _write_verified, read_verified
from distvit.data.tarindex import index_shard
from distvit.errors import DataError
from distvit.fileio import atomic_write_bytes, hold_lock, lock_holder, write_failure

MARK_NAME = ".distvit-cache"
LEDGER_NAME = ".distvit-ledger"
LEDGER_HEADER = "distvit cache ledger 1"
SESSION_PREFIX = "session-"
ERROR_NAME = "error"
VOUCH_PREFIX = "ok-"
INDEX_SUFFIX = ".idx"
PART_SUFFIX = ".part"
ERROR_BYTES = 2048
"""Size of the pre-allocated error file: a 16-byte length header, then the message (cut to fit)."""
VOUCH_BYTES = 160
"""Bytes a shard's vouch takes in the session folder (its sha256, and a temporary copy while it is written)."""
READER_WAIT_S = 600.0
"""How long a reader waits for a shard at least (longer where the fetch policy's tries can take longer)."""
FETCH_THREADS = 4
SESSION_FILE = re.compile(r"(error|needs-\d+\.json|step-\d+|ok-[A-Za-z0-9_][A-Za-z0-9_.-]*)(\.tmp)?")
"""The files of a session folder (the fetcher's and the ranks'): the only names removed with it."""


def cache_file_name(shard: ShardInfo) -> str:
    """The shard's file in the cache: its name with the start of its sha256 (`train-00000.0a1b...c.tar`)."""
    return f"{shard.name[:-4]}.{shard.sha256[:16]}.tar"


def index_file_name(file: str) -> str:
    return file + INDEX_SUFFIX


def index_allowance(shard: ShardInfo) -> int:
    """Bytes reserved for a shard's index: a bound (see _index_rows: keys are cut to fit it)."""
    return 4096 + 160 * shard.num_samples


def shard_bytes(shard: ShardInfo) -> int:
    """What a shard may occupy in the cache at most: its file, its index and its vouch."""
    return shard.num_bytes + index_allowance(shard) + VOUCH_BYTES


def folder_bytes(folder: Path) -> int:
    """Bytes of all files under `folder` (what the limit bounds)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # removed while counted
                pass
    return total


def _shown(names: Iterable[str]) -> str:
    names = sorted(names)
    return ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")


class Ledger:
    """The names the cache created in its folder and has not deleted. A name is recorded before its file
    or folder is created (write-ahead) and dropped after it is deleted, so a name that is not here was
    not written by distvit, whatever it looks like. Rewritten atomically on every change."""

    def __init__(self, folder: Path, names: set[str]):
        self.path, self.names = folder / LEDGER_NAME, names

    @classmethod
    def read(cls, folder: Path) -> Ledger | None:
        path = folder / LEDGER_NAME
        try:
            lines = path.read_text().split("\n")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"cannot read {path} ({err}): the cache cannot tell its files from others.") from None
        if lines[0] != LEDGER_HEADER:
            raise DataError(
                f"{path} is not a distvit cache ledger (damaged?): the cache cannot tell its own files from "
                f"others. Empty data.cache_dir={str(folder)!r} (what is in it is yours to keep or delete) or give "
                "a new folder."
            )
        return cls(folder, {line for line in lines[1:] if line})

    def add(self, *names: str) -> None:
        if not set(names) <= self.names:
            self.names |= set(names)
            self._write()

    def drop(self, *names: str) -> None:
        if self.names & set(names):
            self.names -= set(names)
            self._write()

    def _write(self) -> None:
        atomic_write_bytes(self.path, "\n".join([LEDGER_HEADER, *sorted(self.names), ""]).encode())


def check_cache_dir(folder: str | os.PathLike) -> None:
    """What data.cache_dir must be, checked without changing anything (every rank can check it before
    training): absent, an empty folder, or distvit's cache holding only names its ledger records."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DataError(
            f"data.cache_dir={str(folder)!r} is a file, not a folder: set data.cache_dir to a folder of its own "
            "(new or empty) for the shard cache."
        )
    for attempt in range(2):  # a run that holds the folder may delete a file between the listing and the ledger
        try:
            entries = {path.name for path in folder.iterdir()}
        except FileNotFoundError:
            return
        except OSError as err:
            raise DataError(f"data.cache_dir={str(folder)!r} cannot be read ({err.strerror}).") from None
        if MARK_NAME not in entries:
            if entries:
                raise DataError(
                    f"data.cache_dir={str(folder)!r} holds files distvit did not write ({_shown(entries)}): the "
                    "cache deletes what it evicts, so give it a new or empty folder."
                )
            return
        ledger = Ledger.read(folder)
        others = entries - {MARK_NAME, LEDGER_NAME, LEDGER_NAME + ".tmp"}
        if ledger is None:
            if others:
                raise DataError(
                    f"data.cache_dir={str(folder)!r} holds files that distvit has no record of writing "
                    f"({_shown(others)}: an earlier distvit kept no such record), and the cache deletes only files "
                    "it recorded: move them out (shards there are only a cache) or give a new folder."
                )
            return
        foreign = {name for name in others - ledger.names if (folder / name).exists() or os.path.islink(folder / name)}
        if not foreign:
            return
        if attempt:
            raise DataError(
                f"data.cache_dir={str(folder)!r} holds files distvit did not write ({_shown(foreign)}); they would "
                "count against data.cache_limit and the cache never deletes them. Move them out of the folder."
            )


def open_cache_dir(folder: Path) -> None:
    """Create or adopt `folder` as a cache (see check_cache_dir): a new one gets the mark, then its ledger."""
    check_cache_dir(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        mark = folder / MARK_NAME
        if not mark.is_file():
            mark.touch()
        if Ledger.read(folder) is None:  # only the mark is there (check_cache_dir): nothing to record yet
            Ledger(folder, set())._write()
    except OSError as err:
        raise DataError(f"data.cache_dir={str(folder)!r} cannot be created ({err.strerror}).") from None


class ErrorChannel:
    """The fetcher's failure, for every reader of the node: one file allocated (written in full) when the
    fetcher starts and overwritten in place when it fails, so a full disk cannot refuse the message."""

    @staticmethod
    def create(path: Path) -> None:
        atomic_write_bytes(path, b"0" * 15 + b"\n" + b"\0" * (ERROR_BYTES - 16))

    @staticmethod
    def post(path: Path, message: str) -> None:
        payload = message.encode()[: ERROR_BYTES - 16]
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, payload, 16)
            os.fsync(fd)
            os.pwrite(fd, b"%015d\n" % len(payload), 0)  # the length last: a reader sees all or nothing
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def read(path: Path) -> str | None:
        try:
            with open(path, "rb") as handle:
                length = int(handle.read(16) or b"0")
                return handle.read(length).decode(errors="replace") if length else None
        except (OSError, ValueError):
            return None


def required_bytes(needs: dict[str, list[tuple[int, int]]], sizes: dict[str, int], lookahead: int) -> tuple[int, int]:
    """The most bytes the node's ranks need at once in a pass, and the step where: at step k every shard
    some rank uses between k and k + lookahead (batches its loader reads ahead) must be present.
    `needs`: shard name -> [(first step, last step)] per rank that uses it."""
    if not needs:
        return 0, 0
    horizon = max(last for spans in needs.values() for _, last in spans) + 2
    delta = np.zeros(horizon + lookahead + 2, dtype=np.int64)
    for name, spans in needs.items():
        start = max(0, min(first for first, _ in spans) - lookahead)
        end = max(last for _, last in spans)
        delta[start] += sizes[name]
        delta[end + 1] -= sizes[name]
    live = np.cumsum(delta)
    step = int(live.argmax())
    return int(live[step]), step


def pass_required_bytes(
    order: np.ndarray,
    global_batch: int,
    world: int,
    node_ranks: list[int],
    shard_starts: np.ndarray,
    sizes: np.ndarray,
    lookahead: int,
    start_sample: int = 0,
) -> tuple[int, int]:
    """`required_bytes` of one pass, from its order as the plan slices it (distvit.data.plan.EpochPlan:
    step s, rank r take slots start + s*B + r*B/W ..., a padding slot reads sample 0): the node's ranks
    `node_ranks`, shards starting at sample `shard_starts` (and one past the last) of `sizes` bytes each.
    Vectorised: linear in the samples, for an order per epoch of large datasets."""
    order = np.asarray(order, dtype=np.int64)[start_sample:]
    if not len(order):
        return 0, 0
    steps = -(-len(order) // global_batch)
    padded = np.zeros(steps * global_batch, dtype=np.int64)
    padded[: len(order)] = order
    slots = padded.reshape(steps, world, global_batch // world)[:, node_ranks, :].reshape(steps, -1)
    shard = (np.searchsorted(shard_starts, slots, side="right") - 1).ravel()
    step = np.repeat(np.arange(steps, dtype=np.int64), slots.shape[1])
    first = np.full(len(sizes), steps, dtype=np.int64)
    last = np.full(len(sizes), -1, dtype=np.int64)
    np.minimum.at(first, shard, step)
    np.maximum.at(last, shard, step)
    used = last >= 0
    delta = np.zeros(steps + 2, dtype=np.int64)
    np.add.at(delta, np.maximum(first[used] - lookahead, 0), sizes[used])
    np.add.at(delta, last[used] + 1, -sizes[used])
    live = np.cumsum(delta)
    peak = int(live.argmax())
    return int(live[peak]), peak


def node_ranks(rank: int, world: int) -> list[int]:
    """The global ranks on this node: launchers number a node's ranks consecutively (LOCAL_RANK of
    LOCAL_WORLD_SIZE)."""
    local, count = local_ranks()
    first = rank - local
    return [r for r in range(first, first + count) if 0 <= r < world] or [rank]


@dataclass
class RankPosition:
    """What one local rank needs in its current pass and how far it has read."""

    pass_id: int
    needs: dict[str, tuple[int, int]]
    """Shard name -> (first step, last step) of this rank's use in the pass."""
    step: int
    """Batches read so far (the shards of earlier steps are done with)."""
    lookahead: int

    def remaining(self) -> dict[str, int]:
        """Shards still to be read -> steps until their first use (negative: in use)."""
        return {name: first - self.step for name, (first, last) in self.needs.items() if last >= self.step}


class PassReporter:
    """A rank's side of the protocol: publishes its needs at a pass's start and its position after each
    batch (files in the session folder the node's fetcher made, written atomically)."""

    def __init__(self, session: Path, wait_s: float = READER_WAIT_S):
        self.session, self.wait_s = session, wait_s
        self.rank = local_ranks()[0]
        self.pass_id = 0

    def begin(self, needs: dict[str, tuple[int, int]], lookahead: int) -> None:
        deadline = time.monotonic() + self.wait_s
        while not self.session.is_dir():  # made by local rank 0's fetcher as it starts
            if time.monotonic() > deadline:
                raise DataError(
                    f"the shard cache's fetcher (local rank 0) did not start in {self.session.parent} within "
                    f"{self.wait_s:.0f} s."
                )
            time.sleep(0.01)
        self.pass_id += 1
        payload = {"pass": self.pass_id, "needs": needs, "lookahead": lookahead}
        _replace(self.session / f"needs-{self.rank}.json", json.dumps(payload))
        self.progress(0)

    def progress(self, step: int) -> None:
        _replace(self.session / f"step-{self.rank}", f"{self.pass_id} {step}")


def _replace(path: Path, text: str) -> None:
    """Readers see the old or the new text (no fsync: a position is worthless after a crash anyway)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        raise DataError(
            f"the shard cache: {write_failure(tmp, err)}. Free space there, or point data.cache_dir at a larger disk."
        ) from None


def read_positions(session: Path, ranks: int) -> dict[int, RankPosition]:
    """The local ranks' published positions (a rank that has published nothing yet is absent)."""
    positions = {}
    for rank in range(ranks):
        try:
            needs = json.loads((session / f"needs-{rank}.json").read_text())
            pass_id, step = map(int, (session / f"step-{rank}").read_text().split())
        except (OSError, ValueError):
            continue
        if pass_id != needs["pass"]:
            continue  # between the two writes of a pass's start
        spans = {name: (int(a), int(b)) for name, (a, b) in needs["needs"].items()}
        positions[rank] = RankPosition(pass_id, spans, step, int(needs["lookahead"]))
    return positions


def _remove_session(path: Path) -> None:
    """An earlier launch's session folder (recorded in the ledger): its files, then the folder. Anything
    in it that is not a session file stops the run instead (the cache never deletes what it did not write)."""
    if path.is_symlink() or not path.is_dir():
        raise DataError(f"{path} is not the folder distvit made there: move it out of the cache folder.")
    entries = list(path.iterdir())
    strangers = [p.name for p in entries if not SESSION_FILE.fullmatch(p.name) or p.is_symlink() or not p.is_file()]
    if strangers:
        raise DataError(
            f"{path} holds files distvit did not write ({_shown(strangers)}); the cache would have to delete them "
            "with the folder. Move them out of the cache folder."
        )
    for entry in entries:
        entry.unlink(missing_ok=True)
    path.rmdir()


class ShardFetcher:
    """The node's fetcher (local rank 0): fetches what the local ranks need, in order of need, within the
    limit; evicts what none of them still needs when it needs room (other datasets' leftovers first).
    Counts what it did (for summary.json)."""

    def __init__(
        self,
        folder: Path,
        template: str,
        shards: list[ShardInfo],
        num_classes: int,
        limit: int,
        ranks: int,
        policy: FetchPolicy = FetchPolicy(),
    ):
        self.folder, self.template, self.limit, self.ranks, self.policy = folder, template, limit, ranks, policy
        self.shards = {shard.name: shard for shard in shards}
        self.files = {name: cache_file_name(shard) for name, shard in self.shards.items()}
        self.num_classes = num_classes
        self.session = folder / f"{SESSION_PREFIX}{session_id()}"
        self.stats = {
            "limit": limit,
            "peak_bytes": 0,
            "fetched": 0,
            "fetched_bytes": 0,
            "evicted": 0,
            "reused": 0,
            "leftovers_removed": 0,
        }
        self.present: dict[str, int] = {}  # shard name -> bytes on disk, vouched for in this run
        self.unverified: dict[str, int] = {}  # shard name -> bytes on disk, not yet checked in this run
        self.leftover: dict[str, int] = {}  # file -> bytes: other datasets', or an index without its shard
        self.reserved: dict[str, int] = {}
        self._lock_handle = self._lock()
        try:
            self._adopt()
        except BaseException:
            self._lock_handle.close()
            raise
        self._checked_passes: set[tuple[int, ...]] = set()
        self._pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="distvit-fetch")
        self._counting = threading.Lock()  # the fetch threads count their shards themselves
        self._inflight: dict[str, Future] = {}
        self._stop = threading.Event()
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="distvit-cache", daemon=True)
        self._thread.start()

    def _lock(self):
        handle = hold_lock(self.folder / MARK_NAME)
        if handle is None:
            raise DataError(
                f"data.cache_dir={str(self.folder)!r} is in use by another distvit run "
                f"({lock_holder(self.folder / MARK_NAME)}); its fetcher evicts what it does not need: give each "
                "run (and each node) its own cache folder."
            )
        return handle

    def _adopt(self) -> None:
        """Under the lock: take stock of the folder, remove what a stopped run left unfinished (recorded
        names only), start this launch's session, and fit the limit."""
        folder = self.folder
        check_cache_dir(folder)
        self.ledger = Ledger.read(folder) or Ledger(folder, set())
        if not self.ledger.path.exists():
            self.ledger._write()
        on_disk = {path.name for path in folder.iterdir()}
        gone = {name for name in self.ledger.names if name not in on_disk}
        for name in sorted(self.ledger.names & on_disk):
            path = folder / name
            if name.startswith(SESSION_PREFIX):
                _remove_session(path)  # earlier launches', and this launch's own from an earlier cache object
                gone.add(name)
            elif name.endswith((PART_SUFFIX, ".tmp")):  # a fetch or an index write that a kill interrupted
                path.unlink()
                gone.add(name)
        self.ledger.drop(*gone)
        by_file = {file: name for name, file in self.files.items()}
        sizes = {name: (folder / name).lstat().st_size for name in self.ledger.names}
        for file, size in sizes.items():
            if file in by_file:
                self.unverified[by_file[file]] = size
            elif not (file.endswith(INDEX_SUFFIX) and file[: -len(INDEX_SUFFIX)] in by_file):
                self.leftover[file] = size
        for file, size in sizes.items():  # indexes go with their shard
            if file.endswith(INDEX_SUFFIX) and file[: -len(INDEX_SUFFIX)] in by_file:
                name = by_file[file[: -len(INDEX_SUFFIX)]]
                if name in self.unverified:
                    self.unverified[name] += size
                else:  # its shard is gone (a kill between two deletions): removed now, or a fetch of that
                    (folder / file).unlink()  # shard would write the index that its eviction then removes
                    self.ledger.drop(file)
        self.overhead = self._overhead()
        own, free = folder_bytes(folder), shutil.disk_usage(folder).free
        if own + free < self.limit:
            raise DataError(
                f"data.cache_limit={self.limit} bytes does not fit on the disk of data.cache_dir={str(folder)!r}: "
                f"{free} bytes are free there and the cache holds {own}. Lower data.cache_limit to at most "
                f"{own + free}, or point data.cache_dir at a larger disk."
            )
        if not self._make_room(0, {}, protected=-1):  # a lowered limit: room first, then this run's files
            raise DataError(
                f"data.cache_limit={self.limit} bytes is too small: the cache's own files (ledger, positions, "
                f"error channel) take {self.overhead} bytes before any shard. Raise data.cache_limit."
            )
        self.ledger.add(self.session.name)
        self.session.mkdir()
        ErrorChannel.create(self.session / ERROR_NAME)
        self.record = read_verified(folder)
        for name in list(self.unverified):
            file = self.files[name]
            indexed = (folder / index_file_name(file)).is_file()
            if indexed and _recorded(folder, dataclasses.replace(self.shards[name], name=file), self.record):
                self._vouch(name)  # matched its sha256 before and unchanged since: not hashed again
                self.present[name] = self.unverified.pop(name) + VOUCH_BYTES
                self.stats["reused"] += 1
        kept = {file for file in self.record if file in self.ledger.names}
        if kept != set(self.record):
            self.record = {file: self.record[file] for file in kept}
            _write_verified(folder, self.record)

    def _overhead(self) -> int:
        """Bytes the cache's own files may take beside the shards: the mark, the ledger (twice: it is rewritten
        through a temporary file), the error channel and each local rank's position files (and their
        temporaries). A bound fixed at the start, so that the limit holds for every byte in the folder."""
        line = max((len(index_file_name(file)) + 5 for file in self.files.values()), default=0)
        ledger = len(LEDGER_HEADER) + 2 * (len(self.session.name) + 1) + 4 * line * len(self.files)
        ledger += sum(len(file) + 1 for file in self.leftover)
        needs = 128 + sum(len(name) + 48 for name in self.shards)
        mark = (self.folder / MARK_NAME).stat().st_size + 64
        return mark + 2 * ledger + ERROR_BYTES + self.ranks * 2 * (needs + 64)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._lock_handle.close()

    def _used(self) -> int:
        return (
            sum(self.present.values())
            + sum(self.unverified.values())
            + sum(self.leftover.values())
            + sum(self.reserved.values())
            + self.overhead
        )

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._collect_finished()
                self._schedule(read_positions(self.session, self.ranks))
                self._stop.wait(0.01)
        except DataError as err:
            self._fail(str(err))
        except OSError as err:  # its own files (ledger, vouches, indexes): a full disk above all
            where = Path(err.filename) if err.filename else self.folder / LEDGER_NAME
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                reason = f"{write_failure(where, err)}. Free space there, or point data.cache_dir at a larger disk."
            else:
                reason = f"{where}: {err.strerror or err}."
            self._fail(f"the shard cache in data.cache_dir={str(self.folder)!r} stopped: {reason}")
        except Exception as err:  # noqa: BLE001 - any fetcher failure must reach the readers as one message
            self._fail(f"the shard cache's fetcher in {self.folder} failed ({type(err).__name__}: {err}).")

    def _fail(self, message: str) -> None:
        self.error = message
        try:
            ErrorChannel.post(self.session / ERROR_NAME, message)
        except OSError:
            pass  # the training process of local rank 0 still raises it (ShardCache.check)

    def _collect_finished(self) -> None:
        changed = False
        for name, future in list(self._inflight.items()):
            if not future.done():
                continue
            del self._inflight[name]
            self.reserved.pop(name)
            try:
                on_disk, entry = future.result()  # a failed fetch raises its DataError here
            except Cancelled:
                continue
            self.present[name] = on_disk
            self.record[self.files[name]] = entry
            self.ledger.drop(self.files[name] + PART_SUFFIX, index_file_name(self.files[name]) + ".tmp")
            changed = True
        if changed:
            _write_verified(self.folder, self.record)

    def _schedule(self, positions: dict[int, RankPosition]) -> None:
        if not positions:
            return
        self._check_fits(positions)
        distance: dict[str, int] = {}  # steps until a local rank next reads the shard (0: in use)
        for position in positions.values():
            for name, steps in position.remaining().items():
                distance[name] = min(distance.get(name, steps), max(steps, 0))
        lookahead = max(p.lookahead for p in positions.values())
        for name in sorted(distance, key=lambda n: (distance[n], n)):
            if name in self.present or name in self._inflight:
                continue
            on_disk = self.unverified.pop(name, 0)  # checked (and kept, or replaced) by the job
            size = max(shard_bytes(self.shards[name]), on_disk)
            if not self._make_room(size, distance, max(distance[name], lookahead)):
                if on_disk:
                    self.unverified[name] = on_disk
                return  # in order of need: a later shard never overtakes an earlier one
            self.reserved[name] = size
            self.stats["peak_bytes"] = max(self.stats["peak_bytes"], self._used())
            file = self.files[name]
            index = index_file_name(file)
            self.ledger.add(file, file + PART_SUFFIX, index, index + ".tmp")  # before any of them exists
            self._inflight[name] = self._pool.submit(self._job, name, bool(on_disk))

    def _make_room(self, size: int, distance: dict[str, int], protected: int) -> bool:
        """Evict until `size` more bytes fit: other datasets' leftovers first, then the shard needed last
        (never again in the current passes, then the farthest next use); shards a rank reads within
        `protected` steps stay (in use, read ahead, or needed before the one being made room for). False
        if they cannot fit."""
        never = 1 << 62
        while self._used() + size > self.limit:
            if self.leftover:
                file = max(self.leftover, key=lambda f: (self.leftover[f], f))
                (self.folder / file).unlink(missing_ok=True)
                self.ledger.drop(file)
                del self.leftover[file]
                self.stats["leftovers_removed"] += 1
                continue
            spare = [name for name in (*self.present, *self.unverified) if distance.get(name, never) > protected]
            if not spare:
                return False
            self._evict(max(spare, key=lambda n: (distance.get(n, never), n)))
        return True

    def _evict(self, name: str) -> None:
        file = self.files[name]
        (self.session / f"{VOUCH_PREFIX}{file}").unlink(missing_ok=True)  # first: no reader starts on it now
        (self.folder / file).unlink(missing_ok=True)
        (self.folder / index_file_name(file)).unlink(missing_ok=True)
        self.ledger.drop(file, index_file_name(file))
        self.present.pop(name, None)
        self.unverified.pop(name, None)
        self.stats["evicted"] += 1

    def _check_fits(self, positions: dict[int, RankPosition]) -> None:
        """Once per pass, when every local rank has begun it: the limit holds what the ranks need at once
        (checked for the whole run before its first step by check_passes: this is the backstop)."""
        passes = {p.pass_id for p in positions.values()}
        key = tuple(sorted((rank, p.pass_id) for rank, p in positions.items()))
        if key in self._checked_passes or len(positions) < self.ranks or len(passes) > 1:
            return  # ranks between two passes: the one ending has nothing left to read
        self._checked_passes.add(key)
        needs: dict[str, list[tuple[int, int]]] = {}
        for position in positions.values():
            for name, span in position.needs.items():
                needs.setdefault(name, []).append(span)
        sizes = {name: shard_bytes(self.shards[name]) for name in needs}
        lookahead = max(p.lookahead for p in positions.values())
        need, step = required_bytes(needs, sizes, lookahead)
        if need + self.overhead > self.limit:
            raise DataError(self.too_small_message("this pass", need, step, lookahead))

    def too_small_message(self, what: str, need: int, step: int, lookahead: int) -> str:
        fewer = (
            f"; fewer data.num_workers lower it too (the loaders read {lookahead} batches ahead)" if lookahead else ""
        )
        return (
            f"data.cache_limit={self.limit} bytes is too small: {what} needs {need} bytes of shards at once on this "
            f"node (at its step {step + 1}: the shards of the shuffle window in use and of the batches the loaders "
            f"read ahead), and the cache's own files take {self.overhead}. Raise data.cache_limit to at least "
            f"{need + self.overhead} (for a new run, a smaller data.shuffle_window also lowers it{fewer})."
        )

    def too_small(self, passes: Iterable[tuple], world: int, ranks: list[int], lookahead: int) -> str | None:
        """The error for the first pass whose need the limit cannot hold, else None. `passes`: (what, order,
        global batch, shard names of the split in stored order, first sample of each shard and one past the
        last, start sample)."""
        for what, order, global_batch, names, starts, start_sample in passes:
            sizes = np.array([shard_bytes(self.shards[name]) for name in names], dtype=np.int64)
            need, step = pass_required_bytes(
                order, global_batch, world, ranks, np.asarray(starts), sizes, lookahead, start_sample
            )
            if need + self.overhead > self.limit:
                return self.too_small_message(what, need, step, lookahead)
        return None

    def _vouch(self, name: str) -> None:
        """Tell the readers of this run that the shard's file and index are in place and match the manifest."""
        file = self.files[name]
        atomic_write_bytes(self.session / f"{VOUCH_PREFIX}{file}", self.shards[name].sha256.encode())

    def _job(self, name: str, on_disk: bool) -> tuple[int, list]:
        """Bring the shard into the cache, vouched for: what is on disk if its sha256 matches, else fetched.
        Returns its bytes on disk and its entry for the record of verified files."""
        shard, file = self.shards[name], self.files[name]
        target = self.folder / file
        reused = False
        if on_disk:
            reused = (
                target.is_file() and target.stat().st_size == shard.num_bytes and sha256_file(target) == shard.sha256
            )
            if reused and not (self.folder / index_file_name(file)).is_file():
                self._write_index(target, shard, file)
            if not reused:  # changed since distvit wrote it (the name says which content it held)
                (self.folder / index_file_name(file)).unlink(missing_ok=True)
                target.unlink(missing_ok=True)
        if not reused:
            fetch_file(
                remote_url(self.template, name),
                target,
                shard.num_bytes,
                shard.sha256,
                check=lambda tmp: self._write_index(tmp, shard, file),
                policy=self.policy,
                tmp=self.folder / (file + PART_SUFFIX),
                what=f"shard {name}",
                cancel=self._stop,
                disk_hint="Free space there, or point data.cache_dir at a larger disk.",
            )
        with self._counting:  # counted before the vouch makes it readable: stats never lag the reads
            self.stats["reused" if reused else "fetched"] += 1
            if not reused:
                self.stats["fetched_bytes"] += shard.num_bytes
        self._vouch(name)
        stat = target.stat()
        on_disk_bytes = stat.st_size + (self.folder / index_file_name(file)).stat().st_size + VOUCH_BYTES
        return on_disk_bytes, [stat.st_size, stat.st_mtime_ns, shard.sha256]

    def _write_index(self, tar: Path, shard: ShardInfo, file: str) -> None:
        """The sample index of `tar` (whose sha256 matched `shard`'s), bound to that sha256."""
        rows = _index_rows(index_shard(tar, self.num_classes, shard.num_samples), index_allowance(shard))
        payload = json.dumps({"sha256": shard.sha256, "rows": rows}).encode()
        atomic_write_bytes(self.folder / index_file_name(file), payload)


def _index_rows(locations, allowance: int) -> list[list]:
    """[key, offset, size, ext, label] per sample, within `allowance` bytes of JSON: keys (for messages
    only) are cut where long ones would not fit."""
    rows = [[loc.key, loc.image_offset, loc.image_size, loc.image_ext, loc.label] for loc in locations]
    if len(json.dumps(rows)) + 200 > allowance:
        rows = [[json.dumps(key)[1:41], *rest] for key, *rest in rows]
    return rows


class CacheReader:
    """Readers' side, in any process: a shard's sample index and bytes once the fetcher has vouched for it
    in this run, or the fetcher's error as soon as it posts one."""

    def __init__(self, folder: Path, session: Path, shards: list[ShardInfo], wait_s: float = READER_WAIT_S):
        self.folder, self.session, self.wait_s = folder, session, wait_s
        self.files = {shard.name: cache_file_name(shard) for shard in shards}
        self.sha256 = {shard.name: shard.sha256 for shard in shards}
        self._indexes: dict[str, list] = {}

    def index(self, name: str) -> list:
        """The shard's sample rows [key, offset, size, ext, label], waiting for the fetch if needed."""
        rows = self._indexes.get(name)
        if rows is None:
            rows = self._load_index(name)
            if len(self._indexes) > 256:
                self._indexes.clear()
            self._indexes[name] = rows
        return rows

    def read(self, name: str, offset: int, size: int) -> bytes:
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                with open(self.folder / self.files[name], "rb") as handle:
                    handle.seek(offset)
                    return handle.read(size)
            except FileNotFoundError:  # evicted and needed again: the fetcher brings it back
                self._wait_for_vouch(name, deadline, again=True)

    def failure(self) -> str | None:
        """The fetcher's error, once it has posted one."""
        return ErrorChannel.read(self.session / ERROR_NAME)

    def _load_index(self, name: str) -> list:
        deadline = time.monotonic() + self.wait_s
        while True:
            self._wait_for_vouch(name, deadline)
            path = self.folder / index_file_name(self.files[name])
            try:
                payload = json.loads(path.read_bytes())
            except FileNotFoundError:  # evicted since the vouch
                self._wait_for_vouch(name, deadline, again=True)
                continue
            if payload.get("sha256") != self.sha256[name]:
                raise DataError(f"{path} was not built from shard {name} of the manifest (changed in the cache?).")
            return payload["rows"]

    def _wait_for_vouch(self, name: str, deadline: float, again: bool = False) -> None:
        """Until the fetcher vouches for the shard (`again`: its file was just found missing: wait a moment
        even if the vouch is still there, the fetcher removes it first when it evicts)."""
        vouch = self.session / f"{VOUCH_PREFIX}{self.files[name]}"
        while True:
            try:
                if not again and vouch.read_text() == self.sha256[name]:
                    return
            except FileNotFoundError:
                pass
            again = False
            message = self.failure()
            if message:
                raise DataError(message)
            if time.monotonic() > deadline:
                raise DataError(
                    f"shard {name} did not reach the cache {self.folder} within {self.wait_s:.0f} s: the fetcher "
                    "(local rank 0) is stuck or data.remote is far too slow."
                )
            time.sleep(0.005)


class ShardCache:
    """One per process: the rank's reporter and reader, and on local rank 0 the node's fetcher."""

    def __init__(
        self,
        folder: str,
        template: str,
        limit: int,
        shards: list[ShardInfo],
        num_classes: int,
        policy: FetchPolicy = FetchPolicy(),
    ):
        self.folder = Path(folder)
        self.session = self.folder / f"{SESSION_PREFIX}{session_id()}"
        rank, ranks = local_ranks()
        if rank == 0:
            open_cache_dir(self.folder)
            self.fetcher: ShardFetcher | None = ShardFetcher(
                self.folder, template, shards, num_classes, limit, ranks, policy
            )
        else:
            self.fetcher = None
        wait_s = max(READER_WAIT_S, policy.silent_s() + 60)  # the fetcher's tries end first, with their error
        self.reporter = PassReporter(self.session, wait_s)
        self.reader = CacheReader(self.folder, self.session, shards, wait_s)

    def stats(self) -> dict | None:
        """This node's cache counts (local rank 0), for summary.json."""
        return dict(self.fetcher.stats) if self.fetcher else None

    def check(self) -> None:
        """Raise the fetcher's error in the training process too (its readers see it as a sample failure)."""
        message = self.fetcher.error if self.fetcher is not None else None
        message = message or self.reader.failure()
        if message:
            raise DataError(message)

    def check_passes(
        self,
        sources,
        epochs: int,
        eval_batch: int,
        agree: Callable[[list], list],
        start_epoch: int = 0,
        start_sample: int = 0,
    ) -> None:
        """Before the first step, on every rank: whether the limit holds what this node's ranks need at once
        in every pass of the run (each epoch from `start_epoch`, that one from slot `start_sample`, and the
        evaluation). Local rank 0 of each node works it out; `agree` (accelerate's gather_object) hands
        the verdicts to every rank, so all stop together with the same error. `sources`: the run's
        DataSources (epoch_order, batch_size, world, rank, and its train and eval StreamBatches)."""
        from distvit.data.read.loader import PREFETCH_FACTOR  # the loader imports this module

        verdict = None
        if self.fetcher is not None:
            train, evaluation = sources.train.samples, sources.eval.samples
            passes = (
                (
                    f"epoch {epoch + 1}",
                    sources.epoch_order(epoch).numpy(),
                    sources.batch_size,
                    train.names,
                    train.starts,
                    start_sample if epoch == start_epoch else 0,
                )
                for epoch in range(start_epoch, epochs)
            )
            evaluation_pass = (
                "the evaluation",
                np.arange(len(evaluation)),
                eval_batch,
                evaluation.names,
                evaluation.starts,
                0,
            )
            lookahead = PREFETCH_FACTOR * max(sources.train.num_workers, sources.eval.num_workers)
            ranks = node_ranks(sources.rank, sources.world)
            # one order at a time: a large dataset's orders of every epoch would not fit in memory together
            verdict = self.fetcher.too_small(
                itertools.chain(passes, [evaluation_pass]), sources.world, ranks, lookahead
            )
        message = next((v for v in agree([verdict]) if v), None)
        if message:
            self.close()  # the run ends here: the folder's lock goes with it
            raise DataError(message)

    def close(self) -> None:
        if self.fetcher is not None:
            self.fetcher.close()
