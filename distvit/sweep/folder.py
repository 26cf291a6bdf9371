"""The sweep folder: distvit's own, and bound to one search space.

SWEEP_DIR/sweep.json        the sweep (spec, resolved base config): written first, it marks the folder
SWEEP_DIR/study.journal     the Optuna study (append-only journal; file locks, no database server)
SWEEP_DIR/trials/NNNN/      each trial's run folder (an ordinary distvit run; its log in logs/)
SWEEP_DIR/configs/NNNN.yaml each trial's config, as trained
SWEEP_DIR/claims/           which worker runs which trial, with its heartbeat (see claims.py)
SWEEP_DIR/report/           `distvit sweep report`: trials.csv, table.txt, PNG plots
SWEEP_DIR/best.yaml         the best trial's config, ready to train
SWEEP_DIR/.sweep-lock       held (flock) while a worker asks for or takes a trial

A folder that holds anything else and no sweep.json is refused; a second sweep in the same folder joins
the study only with the same search space (`SweepSpec.search`), and is refused naming the difference.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import time
from collections.abc import Iterator
from pathlib import Path

from distvit.errors import ConfigError
from distvit.fileio import atomic_write_bytes
from distvit.sweep.spec import SweepSpec, differences

RECORD = "sweep.json"
JOURNAL = "study.journal"
TRIALS = "trials"
CONFIGS = "configs"
CLAIMS = "claims"
REPORT = "report"
BEST = "best.yaml"
LOCK = ".sweep-lock"


def trial_dir(sweep_dir: Path, number: int) -> Path:
    return sweep_dir / TRIALS / f"{number:04d}"


def trial_config_path(sweep_dir: Path, number: int) -> Path:
    return sweep_dir / CONFIGS / f"{number:04d}.yaml"


def _write_record(sweep_dir: Path, spec: SweepSpec, created: str) -> None:
    record = {"distvit_sweep": 1, "created": created, **spec.to_json()}
    atomic_write_bytes(sweep_dir / RECORD, (json.dumps(record, indent=1) + "\n").encode())


def _read_record(sweep_dir: Path) -> dict:
    try:
        record = json.loads((sweep_dir / RECORD).read_text())
        if not isinstance(record, dict) or record.get("distvit_sweep") != 1:
            raise ValueError("not a sweep record")
        return record
    except (OSError, ValueError) as err:
        raise ConfigError(f"{sweep_dir / RECORD} is unreadable ({err}); it is not a distvit sweep folder.") from None


def load_sweep(sweep_dir: str | Path) -> SweepSpec:
    """The sweep a folder holds (its sweep.json)."""
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / RECORD).is_file():
        raise ConfigError(
            f"{sweep_dir} is not a distvit sweep folder (no {RECORD}); start a sweep with "
            "`distvit sweep run SWEEP_FILE`."
        )
    return SweepSpec.from_json(_read_record(sweep_dir), sweep_dir)


@contextlib.contextmanager
def sweep_lock(sweep_dir: Path, timeout: float = 600.0) -> Iterator[None]:
    """The folder's lock (flock: released when the holder dies, however it dies)."""
    with open(sweep_dir / LOCK, "a+") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise ConfigError(f"{sweep_dir / LOCK} stayed locked for {timeout:.0f} s (a hung worker?).")
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _refuse_foreign(sweep_dir: Path) -> None:
    """A folder without sweep.json may hold only what a worker creating the sweep writes first (the lock,
    sweep.json's temp file): workers started together (a Slurm array) find each other's, not a user's."""
    if not sweep_dir.is_dir() or (sweep_dir / RECORD).is_file():
        return
    # sweep.json itself too: it may have been renamed into place since the look above
    foreign = sorted(p.name for p in sweep_dir.iterdir() if p.name not in (LOCK, RECORD, f"{RECORD}.tmp"))
    if foreign:
        raise ConfigError(
            f"sweep folder {sweep_dir} is not empty ({', '.join(foreign[:5])}) and holds no distvit sweep "
            f"({RECORD}): distvit writes a sweep only into a new or empty folder. Choose another `dir` (or --dir)."
        )


def open_sweep(spec: SweepSpec) -> SweepSpec:
    """Create the sweep folder for `spec`, or join the sweep it holds if its search is the same (the
    number of trials and the heartbeat timeout are taken from `spec`). Refuses a folder that is not a
    sweep's, and a changed search, naming what changed; changes nothing then."""
    sweep_dir = spec.dir
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise ConfigError(f"sweep folder {sweep_dir} is a file; choose another `dir` (or --dir).")
    _refuse_foreign(sweep_dir)  # before the lock file is created in it
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with sweep_lock(sweep_dir):
        if not (sweep_dir / RECORD).is_file():
            _refuse_foreign(sweep_dir)  # again under the lock: nothing came in meanwhile
            _write_record(sweep_dir, spec, datetime.datetime.now().isoformat(timespec="seconds"))
            return spec
        record = _read_record(sweep_dir)
        stored = SweepSpec.from_json(record, sweep_dir)
        changed = differences(stored.search(), spec.search())
        if changed:
            shown = "; ".join(changed[:5]) + (f"; and {len(changed) - 5} more" if len(changed) > 5 else "")
            raise ConfigError(
                f"sweep folder {sweep_dir} holds a study with another search ({shown}). Its trials would not "
                "be comparable: keep the sweep file as it was, or choose another `dir` (or --dir)."
            )
        if (stored.trials, stored.heartbeat_timeout_s) != (spec.trials, spec.heartbeat_timeout_s):
            _write_record(sweep_dir, spec, record.get("created", ""))
        return spec
