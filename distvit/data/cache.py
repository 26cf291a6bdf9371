"""Streaming from data.remote through a bounded node-local cache (`data.cache_dir`, `data.cache_limit`).

The dataset never has to fit on a node: shards are fetched as the epoch plan needs them and evicted when
no rank of the node needs them again in its current pass. Every rank publishes, at the start of each pass
over a split (a training epoch, an evaluation), which shards it needs at which of its steps, and after
each batch how far it has read. One fetcher per node (threads of local rank 0) reads those, fetches in
the order of need, as far ahead as the limit allows, and makes room by evicting shards that no local rank
still needs. A fetch is reserved against the limit before it starts, so the files in the folder (temporary
ones included) never exceed it. Readers (DataLoader workers of every local rank) wait for a shard's file;
a fetched shard is complete (renamed into place after its size and sha256 matched the manifest) and its
sample index is written beside it first.

Files in the cache folder (distvit's own: a folder that is neither empty nor marked is refused):

    .distvit-cache           the mark, and the lock the node's fetcher holds (pid and host inside)
    NAME.tar, NAME.tar.idx   a verified shard and its sample index (kept across runs: a requeue reuses them)
    .fetch-error             why the fetcher stopped; readers hand it on as the failure of their sample
    session-ID/              each local rank's needs and position in the current pass (ID: the launcher)

The epoch order is the plan's (distvit.data.plan), so exactly-once, equal steps and exact resume hold as
with local shards; `data.shuffle=window` makes the order one that a small cache can serve.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distvit.data.manifest import ShardInfo
from distvit.data.node import local_ranks, session_id
from distvit.data.remote import fetch_file, remote_url
from distvit.data.tarindex import index_shard
from distvit.errors import DataError
from distvit.fileio import atomic_write_bytes, hold_lock, lock_holder

MARK_NAME = ".distvit-cache"
ERROR_NAME = ".fetch-error"
INDEX_SUFFIX = ".idx"
READER_WAIT_S = 600.0
"""How long a reader waits for a shard before it gives up (the fetcher is stuck or far too slow)."""
FETCH_THREADS = 4


def open_cache_dir(folder: Path) -> None:
    """Create or adopt `folder` as a cache: it must be new, empty or already distvit's cache."""
    folder.mkdir(parents=True, exist_ok=True)
    mark = folder / MARK_NAME
    if not mark.is_file():
        own = f"session-{session_id()}"  # this launch's other ranks may have made it already
        foreign = [p.name for p in folder.iterdir() if p.name != own]
        if foreign:
            names = ", ".join(sorted(foreign)[:3]) + (", ..." if len(foreign) > 3 else "")
            raise DataError(
                f"data.cache_dir={str(folder)!r} holds files distvit did not write ({names}): the cache deletes "
                "what it evicts, so give it a new or empty folder."
            )
        mark.touch()


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
    batch (files in the session folder, written atomically)."""

    def __init__(self, folder: Path):
        self.session = folder / f"session-{session_id()}"
        self.session.mkdir(parents=True, exist_ok=True)
        self.rank = local_ranks()[0]
        self.pass_id = 0

    def begin(self, needs: dict[str, tuple[int, int]], lookahead: int) -> None:
        self.pass_id += 1
        payload = {"pass": self.pass_id, "needs": needs, "lookahead": lookahead}
        _replace(self.session / f"needs-{self.rank}.json", json.dumps(payload))
        self.progress(0)

    def progress(self, step: int) -> None:
        _replace(self.session / f"step-{self.rank}", f"{self.pass_id} {step}")


def _replace(path: Path, text: str) -> None:
    """Readers see the old or the new text (no fsync: a position is worthless after a crash anyway)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


class ShardFetcher:
    """The node's fetcher (local rank 0): fetches what the local ranks need, in order of need, within the
    limit; evicts what none of them still needs when it needs room. Counts what it did (for summary.json)."""

    def __init__(self, folder: Path, template: str, shards: list[ShardInfo], num_classes: int, limit: int, ranks: int):
        self.folder, self.template, self.limit, self.ranks = folder, template, limit, ranks
        self.shards = {shard.name: shard for shard in shards}
        self.num_classes = num_classes
        self.session = folder / f"session-{session_id()}"
        self.session.mkdir(parents=True, exist_ok=True)
        self._lock_handle = self._lock()
        self._remove_stale_sessions()
        (folder / ERROR_NAME).unlink(missing_ok=True)
        self.present: dict[str, int] = {}  # name -> bytes on disk (shard + index)
        for name, shard in self.shards.items():
            path = folder / name
            for leftover in folder.glob(f"{name}.*.tmp"):  # a fetch killed midway (remote.fetch_file's name)
                leftover.unlink(missing_ok=True)
            if path.is_file() and path.stat().st_size == shard.num_bytes and _index_path(path).is_file():
                self.present[name] = shard.num_bytes + _index_path(path).stat().st_size
        self.reserved: dict[str, int] = {}
        self.stats = {"limit": limit, "peak_bytes": 0, "fetched": 0, "fetched_bytes": 0, "evicted": 0, "reused": 0}
        self._checked_passes: set[tuple[int, ...]] = set()
        self._pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="distvit-fetch")
        self._counting = threading.Lock()  # the fetch threads count their shards themselves
        self._inflight: dict[str, Future] = {}
        self._stop = threading.Event()
        self.error: str | None = None
        self._make_room(0, {}, protected=-1)  # a limit lowered since the last run
        self.stats["reused"] = len(self.present)
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

    def _remove_stale_sessions(self) -> None:
        """Earlier launches' position folders (only in a marked cache, only distvit's `session-<pid>`)."""
        for path in self.folder.glob("session-*"):
            if path != self.session and path.name[8:].isdigit() and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._lock_handle.close()

    def _used(self) -> int:
        return sum(self.present.values()) + sum(self.reserved.values())

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._collect_finished()
                self._schedule(read_positions(self.session, self.ranks))
                self._stop.wait(0.01)
        except DataError as err:
            self._fail(str(err))
        except Exception as err:  # noqa: BLE001 - any fetcher failure must reach the readers as one message
            self._fail(f"the shard cache's fetcher failed ({type(err).__name__}: {err}).")

    def _fail(self, message: str) -> None:
        self.error = message
        atomic_write_bytes(self.folder / ERROR_NAME, message.encode())

    def _collect_finished(self) -> None:
        for name, future in list(self._inflight.items()):
            if future.done():
                del self._inflight[name]
                reserved = self.reserved.pop(name)
                future.result()  # a failed fetch raises its DataError here
                self.present[name] = reserved

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
            size = self.shards[name].num_bytes + _index_allowance(self.shards[name])
            if not self._make_room(size, distance, max(distance[name], lookahead)):
                return  # in order of need: a later shard never overtakes an earlier one
            self.reserved[name] = size
            self.stats["peak_bytes"] = max(self.stats["peak_bytes"], self._used())
            self._inflight[name] = self._pool.submit(self._fetch, name)

    def _make_room(self, size: int, distance: dict[str, int], protected: int) -> bool:
        """Evict until `size` more bytes fit, the shard needed last first (never again in the current
        passes, then the farthest next use); shards a rank reads within `protected` steps stay (in use, read
        ahead, or needed before the one being made room for). False if they cannot fit."""
        never = 1 << 62
        while self._used() + size > self.limit:
            spare = [name for name in self.present if distance.get(name, never) > protected]
            if not spare:
                return False
            name = max(spare, key=lambda n: distance.get(n, never))
            (self.folder / name).unlink(missing_ok=True)
            _index_path(self.folder / name).unlink(missing_ok=True)
            del self.present[name]
            self.stats["evicted"] += 1
        return True

    def _check_fits(self, positions: dict[int, RankPosition]) -> None:
        """Once per combination of the ranks' passes: the limit holds what the ranks need at once."""
        key = tuple(sorted((rank, p.pass_id) for rank, p in positions.items()))
        if key in self._checked_passes or len(positions) < self.ranks:
            return
        self._checked_passes.add(key)
        needs: dict[str, list[tuple[int, int]]] = {}
        for position in positions.values():
            for name, span in position.needs.items():
                needs.setdefault(name, []).append(span)
        sizes = {name: self.shards[name].num_bytes + _index_allowance(self.shards[name]) for name in needs}
        lookahead = max(p.lookahead for p in positions.values())
        need, step = required_bytes(needs, sizes, lookahead)
        if need > self.limit:
            raise DataError(
                f"data.cache_limit={self.limit} bytes is too small: at step {step} of this pass the ranks of this "
                f"node read from shards of {need} bytes at once (the shuffle window's shards and the batches "
                f"the loaders read ahead). Raise data.cache_limit to at least {need}, or lower data.shuffle_window."
            )

    def _fetch(self, name: str) -> None:

        shard, target = self.shards[name], self.folder / name

        def write_index(tmp: Path) -> None:
            locations = index_shard(tmp, self.num_classes, shard.num_samples)
            rows = [[loc.key, loc.image_offset, loc.image_size, loc.image_ext, loc.label] for loc in locations]
            atomic_write_bytes(_index_path(target), json.dumps(rows).encode())
            with self._counting:  # counted before the rename makes it readable: stats never lag the reads
                self.stats["fetched"] += 1
                self.stats["fetched_bytes"] += shard.num_bytes

        fetch_file(remote_url(self.template, name), target, shard.num_bytes, shard.sha256, check=write_index)


def _index_path(shard_path: Path) -> Path:
    return shard_path.with_name(shard_path.name + INDEX_SUFFIX)


def _index_allowance(shard: ShardInfo) -> int:
    """Bytes reserved for a shard's index: ~100 bytes per sample, a bound (keys are short)."""
    return 4096 + 160 * shard.num_samples


class CacheReader:
    """Readers' side, in any process: the path and sample index of a shard once it is in the cache."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._indexes: dict[str, list] = {}

    def index(self, name: str) -> list:
        """The shard's sample rows [key, offset, size, ext, label], waiting for the fetch if needed."""
        rows = self._indexes.get(name)
        if rows is None:
            rows = self._wait_for(name)
            if len(self._indexes) > 256:
                self._indexes.clear()
            self._indexes[name] = rows
        return rows

    def read(self, name: str, offset: int, size: int) -> bytes:
        deadline = time.monotonic() + READER_WAIT_S
        while True:
            try:
                with open(self.folder / name, "rb") as handle:
                    handle.seek(offset)
                    return handle.read(size)
            except FileNotFoundError:  # evicted and needed again: the fetcher brings it back
                self._pause(name, deadline)

    def _wait_for(self, name: str) -> list:
        deadline = time.monotonic() + READER_WAIT_S
        while True:
            try:
                return json.loads(_index_path(self.folder / name).read_bytes())
            except FileNotFoundError:
                self._pause(name, deadline)

    def _pause(self, name: str, deadline: float) -> None:
        error = self.folder / ERROR_NAME
        if error.is_file():
            raise DataError(error.read_text())
        if time.monotonic() > deadline:
            raise DataError(
                f"shard {name} did not reach the cache {self.folder} within {READER_WAIT_S:.0f} s: the fetcher "
                "(local rank 0) is stuck or data.remote is far too slow."
            )
        time.sleep(0.005)


class ShardCache:
    """One per process: the rank's reporter and reader, and on local rank 0 the node's fetcher."""

    def __init__(self, folder: str, template: str, limit: int, shards: list[ShardInfo], num_classes: int):
        self.folder = Path(folder)
        rank, ranks = local_ranks()
        if rank == 0:
            open_cache_dir(self.folder)
            self.fetcher: ShardFetcher | None = ShardFetcher(self.folder, template, shards, num_classes, limit, ranks)
        else:
            self.fetcher = None
        self.reporter = PassReporter(self.folder)
        self.reader = CacheReader(self.folder)

    def stats(self) -> dict | None:
        """This node's cache counts (local rank 0), for summary.json."""
        return dict(self.fetcher.stats) if self.fetcher else None

    def check(self) -> None:
        """Raise the fetcher's error in the training process too (its readers see it as a sample failure)."""
        if self.fetcher is not None and self.fetcher.error:
            raise DataError(self.fetcher.error)

    def close(self) -> None:
        if self.fetcher is not None:
            self.fetcher.close()
