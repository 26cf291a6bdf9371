"""A real, local Slurm cluster for tests: one slurmctld and two slurmd (nodes n1, n2) on this host.

Needs root and the Debian/Ubuntu packages slurm-wlm and munge (`.ci/install-slurm.sh`). Everything the
cluster writes lives in one private folder (default /tmp/distvit-slurm): its own munge key and munged
socket, its own slurm.conf (commands find it through SLURM_CONF, see `LocalCluster.env()`), state, spool
and logs. /etc/slurm and /etc/munge are not touched; /etc/hosts gets `127.0.0.1 n1 n2` if those names do
not resolve.

    cluster = LocalCluster()
    cluster.start()                                   # waits until n1 and n2 are idle
    job = cluster.sbatch(["--wrap", "hostname"], cwd=tmp)
    assert cluster.wait(job, timeout=30) == "COMPLETED"
    cluster.stop()                                    # cancels jobs, stops every daemon it started

An flock on <folder>/.lock serialises clusters that share the folder (two pytest sessions at once);
`start()` first kills whatever a previous, crashed session left running from the same folder.
"""

from __future__ import annotations

import atexit
import fcntl
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DEFAULT_DIR = Path("/tmp/distvit-slurm")
NODES = ("n1", "n2")
# Job states after which a job never runs again (a requeued job passes through REQUEUED/PENDING).
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "SPECIAL_EXIT",
        "REVOKED",
    }
)
DAEMONS = ("slurmctld", "slurmd", "munged")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
# Marks the environment of every daemon this module starts, so leftovers can be found in /proc.
MARKER = "DISTVIT_SLURM_DIR"
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _which(name: str) -> str | None:
    """Like shutil.which, but also looks in the sbin folders (where the daemons live)."""
    path = os.environ.get("PATH", "") + os.pathsep + SBIN_PATH
    return shutil.which(name, path=path)


def slurm_available() -> str | None:
    """None when a LocalCluster can run here, else why not."""
    if not hasattr(os, "geteuid") or not Path("/proc").is_dir():
        return "Slurm tests need Linux"
    missing = [name for name in (*DAEMONS, *CLIENTS) if _which(name) is None]
    if missing:
        return f"Slurm not installed (missing {', '.join(missing)}); run `sudo bash .ci/install-slurm.sh`"
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (SlurmUser=root, munged, /etc/hosts)"
    return None


class SlurmError(RuntimeError):
    pass


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"--- {path}: (missing)"
    return f"--- {path} (last {min(lines, len(text))} lines):\n" + "\n".join(text[-lines:])


def parse_scontrol(line: str) -> dict[str, str]:
    """Parse one `scontrol show ... -o` record (Key=Value pairs; values may contain spaces)."""
    keys = list(re.finditer(r"(?:^|\s)([A-Za-z][\w:/.\-]*)=", line))
    out: dict[str, str] = {}
    for i, match in enumerate(keys):
        end = keys[i + 1].start() if i + 1 < len(keys) else len(line)
        out[match.group(1)] = line[match.end() : end].strip()
    return out


def _pids_with_env(*entries: str) -> list[int]:
    """Processes whose environment holds every NAME=VALUE of `entries`; never this process or its ancestors."""
    needles = [entry.encode() for entry in entries]
    spare = set()
    pid = os.getpid()
    while pid > 1:
        spare.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in spare:
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(needle in environ for needle in needles):
            pids.append(int(entry.name))
    return pids


def _has_job_id(pid: int) -> bool:
    try:
        return any(item.startswith(b"SLURM_JOB_ID=") for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
    except OSError:
        return False


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class LocalCluster:
    """A two-node Slurm cluster on this host (see the module docstring).

    Attributes: `dir` (private folder), `conf` (its slurm.conf), `nodes` (("n1", "n2")).
    Methods: start(), stop(), env(), run(cmd), sbatch(args, cwd), wait(job_id, timeout),
    job_info(job_id), job_state(job_id), wait_state(job_id, states, timeout), scancel(args),
    queue(), log_tails().
    """

    def __init__(
        self,
        directory: str | os.PathLike = DEFAULT_DIR,
        *,
        ctld_port: int = 16817,
        node_ports: tuple[int, int] = (17001, 17002),
        cpus_per_node: int = 2,
        cred_expire: int = 10,
        lock_timeout: float = 300.0,
    ):
        self.dir = Path(directory)
        self.conf = self.dir / "slurm.conf"
        self.nodes = NODES
        self.ctld_port = ctld_port
        self.node_ports = node_ports
        self.cpus_per_node = cpus_per_node
        self.cred_expire = cred_expire
        self.lock_timeout = lock_timeout
        self.munge_dir = self.dir / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self._lock_fd: int | None = None
        self._procs: list[subprocess.Popen] = []
        self._started = False
        self.munge_user: str | None = None  # who runs munged: "munge" or "root"

    # -- environment ---------------------------------------------------------------------------

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for Slurm commands and anything that calls them: SLURM_CONF points at this
        cluster; SLURM_* variables inherited from an outer Slurm job are dropped."""
        env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        path = env.get("PATH", "")
        env["PATH"] = path + (os.pathsep if path else "") + SBIN_PATH
        return env

    def _daemon_env(self) -> dict[str, str]:
        return {"PATH": SBIN_PATH, "SLURM_CONF": str(self.conf), MARKER: str(self.dir), "LANG": "C.UTF-8"}

    def run(self, cmd: list[str], timeout: float = 30, check: bool = True, **kw) -> subprocess.CompletedProcess:
        """Run a Slurm command against this cluster; returns the CompletedProcess (text)."""
        result = subprocess.run(
            cmd, env=kw.pop("env", None) or self.env(), capture_output=True, text=True, timeout=timeout, **kw
        )
        if check and result.returncode != 0:
            raise SlurmError(f"{' '.join(map(str, cmd))} -> exit {result.returncode}\n{result.stdout}{result.stderr}")
        return result

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> "LocalCluster":
        """Start munged, slurmctld and slurmd n1/n2; return once both nodes are idle.
        A second call on a running cluster is a no-op."""
        if self._started and self._healthy():
            return self
        reason = slurm_available()
        if reason:
            raise SlurmError(reason)
        self._lock()
        try:
            self._kill_leftovers()
            self._prepare_dirs()
            self._ensure_hosts()
            self._write_conf()
            self._start_munged()
            self._start_slurmctld(timeout)
            for node in self.nodes:
                self._spawn(
                    "slurmd",
                    [_which("slurmd"), "-D", "-N", node, "-f", str(self.conf)],
                    self.dir / f"slurmd.{node}.out",
                )
            self._wait_nodes_idle(timeout)
        except BaseException:
            self.stop()
            raise
        self._started = True
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        """Cancel all jobs, `scontrol shutdown`, then kill whatever of this cluster still runs."""
        if self._lock_fd is None:
            return
        try:
            if self._ctld_up():
                self._cancel_all()
                self.run(["scontrol", "shutdown"], timeout=15, check=False)
            deadline = time.monotonic() + 10
            slurm = [p for p in self._procs if not str(p.args[0]).endswith("munged")]
            while time.monotonic() < deadline and any(p.poll() is None for p in slurm):
                time.sleep(0.2)
        except (subprocess.SubprocessError, OSError):
            pass
        finally:
            self._kill_leftovers()
            for proc in self._procs:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            self._procs.clear()
            self._started = False
            self._unlock()
            atexit.unregister(self.stop)

    # -- jobs ----------------------------------------------------------------------------------

    def sbatch(self, args: list[str], cwd: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> str:
        """Submit a batch job (`sbatch --parsable ARGS`) from cwd; returns the job id."""
        result = self.run(["sbatch", "--parsable", *map(str, args)], cwd=cwd, env=env or self.env())
        return result.stdout.strip().split(";")[0]

    def scancel(self, args: list[str]) -> subprocess.CompletedProcess:
        return self.run(["scancel", *map(str, args)])

    def job_info(self, job_id: str | int) -> dict[str, str]:
        """`scontrol show job -o ID` as a dict (JobState, ExitCode, Restarts, NodeList, BatchHost...);
        the key RestartCnt repeats Restarts. For a job with several records (arrays) the first."""
        result = self.run(["scontrol", "show", "job", "-o", str(job_id)], timeout=15)
        lines = [line for line in result.stdout.splitlines() if line.strip()]
        if not lines:
            raise SlurmError(f"no record for job {job_id}")
        info = parse_scontrol(lines[0])
        info.setdefault("RestartCnt", info.get("Restarts", "0"))
        return info

    def job_state(self, job_id: str | int) -> str:
        return self.job_info(job_id)["JobState"]

    def wait_state(
        self, job_id: str | int, states: set[str] | frozenset[str], timeout: float = 60.0, poll: float = 0.25
    ) -> str:
        """Poll until the job's state is in `states` (or final); returns it; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job_id)
            if state in states or state in FINAL_STATES:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} still {state} after {timeout:.0f} s: {self.job_info(job_id)}\n" + self.log_tails()
                )
            time.sleep(poll)

    def wait(self, job_id: str | int, timeout: float = 60.0, poll: float = 0.25) -> str:
        """Wait until the job ended for good; returns its final JobState (COMPLETED, FAILED, ...).
        Job records stay for MinJobAge=300 s after the end."""
        return self.wait_state(job_id, FINAL_STATES, timeout, poll)

    def queue(self) -> list[dict[str, str]]:
        """Jobs slurmctld still knows (running, pending and ended within MinJobAge)."""
        out = self.run(["scontrol", "show", "job", "-o"], timeout=15, check=False).stdout
        return [parse_scontrol(line) for line in out.splitlines() if "JobId=" in line]

    def log_tails(self, lines: int = 25) -> str:
        files = [
            self.dir / "slurmctld.log",
            *(self.dir / f"slurmd.{n}.log" for n in self.nodes),
            self.dir / "slurmctld.out",
            *(self.dir / f"slurmd.{n}.out" for n in self.nodes),
            self.munge_dir / "munged.log",
        ]
        return "\n".join(_tail(f, lines) for f in files if f.exists())

    # -- internals -----------------------------------------------------------------------------

    def _lock(self) -> None:
        if self._lock_fd is not None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise SlurmError(
                        f"another LocalCluster holds {self.dir}/.lock (a second test session?) "
                        f"for over {self.lock_timeout:.0f} s"
                    )
                time.sleep(1)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _leftover_pids(self) -> list[int]:
        """Daemons started from this folder (they carry MARKER, slurmstepd too) and processes of the
        cluster's jobs (they carry the SLURM_CONF of env() and a SLURM_JOB_ID)."""
        daemons = _pids_with_env(f"{MARKER}={self.dir}")
        jobs = [pid for pid in _pids_with_env(f"SLURM_CONF={self.conf}") if _has_job_id(pid)]
        return sorted(set(daemons + jobs))

    def _kill_leftovers(self) -> None:
        """Stop what a crashed session (or this one) left running from this folder: cancel its jobs and
        shut it down while slurmctld still answers, then TERM and KILL the rest."""
        if self.conf.exists() and _pids_with_env(f"{MARKER}={self.dir}") and self._ctld_up():
            try:
                self._cancel_all()
                self.run(["scontrol", "shutdown"], timeout=15, check=False)
            except (subprocess.SubprocessError, OSError):
                pass
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(
                _comm(pid) in ("slurmctld", "slurmd") for pid in _pids_with_env(f"{MARKER}={self.dir}")
            ):
                self._reap()
                time.sleep(0.2)
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            pids = self._leftover_pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(_alive(p) for p in pids):
                self._reap()
                time.sleep(0.1)

    def _reap(self) -> None:
        for proc in self._procs:
            proc.poll()  # reap our own children so they do not linger as zombies

    def _prepare_dirs(self) -> None:
        for name in ("state", "spool", "munge"):
            shutil.rmtree(self.dir / name, ignore_errors=True)
        for name in (
            "slurmctld.log",
            "slurmctld.out",
            "slurmctld.pid",
            *(f"slurmd.{n}.{ext}" for n in self.nodes for ext in ("log", "out", "pid")),
        ):
            (self.dir / name).unlink(missing_ok=True)
        (self.dir / "state").mkdir(mode=0o755)
        for node in self.nodes:
            (self.dir / "spool" / node).mkdir(mode=0o755, parents=True)
        self.munge_dir.mkdir(mode=0o755)  # munged wants its socket folder world-executable

    def _ensure_hosts(self) -> None:
        missing = []
        for node in self.nodes:
            try:
                socket.gethostbyname(node)
            except OSError:
                missing.append(node)
        if missing:
            with open("/etc/hosts", "a") as hosts:
                hosts.write(f"127.0.0.1 {' '.join(missing)}  # distvit tests/support/slurm_cluster.py\n")

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        d = self.dir
        node_lines = "\n".join(
            f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus_per_node} "
            f"RealMemory=1000 State=UNKNOWN"
            for node, port in zip(self.nodes, self.node_ports)
        )
        self.conf.write_text(f"""\
# Written by tests/support/slurm_cluster.py; rewritten on every start.
ClusterName=distvit-test
MailProg=/bin/true
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_min_interval=100000
PreemptType=preempt/none
{self._none_plugins()}ReturnToService=2
JobRequeue=1
MinJobAge=300
KillWait=10
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
InactiveLimit=0
Waittime=0
{node_lines}
PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")

    @staticmethod
    def _none_plugins() -> str:
        """No accounting: the */none plugin lines where this Slurm ships those plugins (newer releases
        dropped some; their default is none anyway)."""
        dirs = [
            Path(p)
            for pattern in (
                "/usr/lib/*/slurm-wlm",
                "/usr/lib/*/slurm",
                "/usr/lib64/slurm",
                "/usr/lib/slurm",
                "/usr/local/lib/slurm",
            )
            for p in glob.glob(pattern)
        ]
        lines = []
        for key, plugin in (
            ("AccountingStorageType", "accounting_storage/none"),
            ("JobAcctGatherType", "jobacct_gather/none"),
            ("JobCompType", "jobcomp/none"),
        ):
            if any((d / (plugin.replace("/", "_") + ".so")).exists() for d in dirs):
                lines.append(f"{key}={plugin}\n")
            else:
                lines.append(f"# {key}: default (none)\n")
        return "".join(lines)

    def _spawn(self, name: str, cmd: list[str | None], out: Path, **kw) -> subprocess.Popen:
        if None in cmd:
            raise SlurmError(f"{name} not found")
        with open(out, "ab") as log:
            proc = subprocess.Popen(
                [str(c) for c in cmd],
                env=self._daemon_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.dir,
                **kw,
            )
        self._procs.append(proc)
        return proc

    def _start_munged(self) -> None:
        key = self.munge_dir / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        base = [
            _which("munged"),
            "-F",
            f"--socket={self.munge_socket}",
            f"--key-file={key}",
            f"--pid-file={self.munge_dir}/munged.pid",
            f"--log-file={self.munge_dir}/munged.log",
            f"--seed-file={self.munge_dir}/munged.seed",
        ]
        attempts = []
        try:
            import pwd

            munge = pwd.getpwnam("munge")
            attempts.append(("munge", munge.pw_uid, munge.pw_gid))
        except (ImportError, KeyError):
            pass
        attempts.append(("root", 0, 0))
        errors = []
        for user, uid, gid in attempts:
            for path in (self.munge_dir, *self.munge_dir.iterdir()):
                os.chown(path, uid, gid)
            cmd = base + (["--force"] if user == "root" else [])
            kw = {"user": uid, "group": gid, "extra_groups": []} if uid != 0 else {}
            proc = self._spawn("munged", cmd, self.munge_dir / "munged.out", **kw)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and proc.poll() is None and not self.munge_socket.exists():
                time.sleep(0.05)
            if proc.poll() is None and self.munge_socket.exists():
                self.munge_user = user
                return
            proc.kill()
            proc.wait()
            self._procs.remove(proc)
            errors.append(
                f"as {user}: exit {proc.returncode}\n{_tail(self.munge_dir / 'munged.out')}\n"
                f"{_tail(self.munge_dir / 'munged.log')}"
            )
        raise SlurmError("munged did not start:\n" + "\n".join(errors))

    def _ctld_up(self) -> bool:
        try:
            result = self.run(["scontrol", "ping"], timeout=10, check=False)
        except (subprocess.SubprocessError, OSError):
            return False
        return result.returncode == 0 and "is UP" in result.stdout

    def _start_slurmctld(self, timeout: float) -> None:
        proc = self._spawn(
            "slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)], self.dir / "slurmctld.out"
        )
        deadline = time.monotonic() + timeout
        while not self._ctld_up():
            if proc.poll() is not None:
                raise SlurmError(f"slurmctld exited with {proc.returncode}\n{self.log_tails()}")
            if time.monotonic() > deadline:
                raise SlurmError(f"slurmctld not answering after {timeout:.0f} s\n{self.log_tails()}")
            time.sleep(0.2)

    def _node_states(self) -> dict[str, str]:
        result = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=10, check=False)
        states = {}
        for line in result.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                states[parts[0]] = parts[1]
        return states

    def _wait_nodes_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while True:
            states = self._node_states()
            if all(states.get(node) == "idle" for node in self.nodes):
                return
            dead = [p for p in self._procs if p.poll() is not None]
            if dead:
                raise SlurmError(
                    f"{' '.join(map(str, dead[0].args))} exited with {dead[0].returncode}; "
                    f"nodes {states}\n{self.log_tails()}"
                )
            if time.monotonic() > deadline:
                raise SlurmError(f"nodes not idle after {timeout:.0f} s: {states}\n{self.log_tails()}")
            time.sleep(0.25)

    def _healthy(self) -> bool:
        return (
            self._ctld_up()
            and all(p.poll() is None for p in self._procs)
            and all(s == "idle" or s.startswith(("mix", "alloc")) for s in self._node_states().values())
        )

    def _cancel_all(self, timeout: float = 20.0) -> None:
        """Cancel every job and wait (KillWait=10 s) until none runs, so no job outlives the cluster."""
        active = [j["JobId"] for j in self.queue() if j.get("JobState") not in FINAL_STATES]
        if not active:
            return
        self.run(["scancel", *active], check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(j.get("JobState") in FINAL_STATES for j in self.queue()):
                return
            time.sleep(0.25)
