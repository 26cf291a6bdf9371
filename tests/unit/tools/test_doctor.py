"""distvit.tools.doctor: the parts that need no process group: the rank variables (launcher or Slurm), the
rendezvous address checks, the run-directory marker, versions, the verdict table, and a single rank."""

from __future__ import annotations

import json
import os
import socket

import accelerate
import pytest
import timm
import torch

from distvit.tools.doctor import (
    EXIT_DOCTOR_FAILED,
    RankReport,
    _verdict,
    check_rendezvous,
    check_run_dir,
    rank_environment,
    run_doctor,
    versions,
)

DEFAULTS = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
LAUNCH_VARS = (*DEFAULTS, "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE")


@pytest.fixture
def env(monkeypatch):
    """A clean launch environment; set variables with env(NAME=value, ...). Restored afterwards, also what
    run_doctor itself exports."""
    for name in LAUNCH_VARS:
        monkeypatch.setenv(name, "")  # recorded, so that teardown restores the variable's original state
        monkeypatch.delenv(name)

    def setenv(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return setenv


def test_no_launcher_is_a_single_rank_on_localhost(env):
    assert rank_environment() == (DEFAULTS, [])


def test_launcher_variables_and_a_rendezvous_override(env):
    env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="head", MASTER_PORT="1234", LOCAL_WORLD_SIZE="2")
    assert rank_environment() == (
        {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "head", "MASTER_PORT": "1234"},
        [],
    )
    found, problems = rank_environment("node7:29400")
    assert (found["MASTER_ADDR"], found["MASTER_PORT"], problems) == ("node7", "29400", [])


def test_slurm_task_variables_fill_in_what_the_launcher_did_not_set(env):
    env(SLURM_PROCID="3", SLURM_NTASKS="4", SLURM_LOCALID="1", SLURM_NTASKS_PER_NODE="2(x2)")
    assert rank_environment() == ({**DEFAULTS, "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, [])
    env(RANK="2")  # a launcher inside the Slurm task wins
    assert rank_environment()[0]["RANK"] == "2"
    env(SLURM_LOCALID="2")
    assert rank_environment()[1] == ["LOCAL_RANK=2 is outside LOCAL_WORLD_SIZE=2"]


@pytest.mark.parametrize(
    "values, problems",
    [
        ({"RANK": "4", "WORLD_SIZE": "4"}, ["RANK=4 is outside WORLD_SIZE=4"]),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "70000"}, ["MASTER_PORT=70000 is not a port number"]),
        (
            {"RANK": "-1", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2", "MASTER_PORT": "0"},
            [
                "RANK=-1 is outside WORLD_SIZE=2",
                "LOCAL_RANK=3 is outside LOCAL_WORLD_SIZE=2",
                "MASTER_PORT=0 is not a port number",
            ],
        ),
    ],
)
def test_inconsistent_rank_variables_are_named(env, values, problems):
    env(**values)
    assert rank_environment()[1] == problems


@pytest.mark.parametrize(
    "values, local_world",
    [
        ({"RANK": "first", "WORLD_SIZE": "2"}, "'0'"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "abc"}, "'abc'"),
    ],
)
def test_rank_variables_that_are_not_integers_are_reported_not_raised(env, values, local_world):
    env(**values)
    found, problems = rank_environment()
    assert problems == [f"rank variables are not integers: {found} (ranks on the node: {local_world})"]


def test_rendezvous_checks_without_a_process_group():
    rank0 = {"RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    assert check_rendezvous(rank0, timeout=1) is None  # rank 0 can listen on its own address
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert check_rendezvous({"RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}, 2) is None
    problem = check_rendezvous({"RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}, 0.2)
    assert problem == (
        f"cannot connect to the rendezvous 127.0.0.1:{port} (127.0.0.1) from {socket.gethostname()} within 0 s"
    )


def test_run_dir_marker(tmp_path):
    problem, marker = check_run_dir(tmp_path / "run", 3, "n1")
    assert problem is None and marker == tmp_path / "run" / ".doctor" / "n1-rank3.json"
    assert json.loads(marker.read_text()) == {"host": socket.gethostname(), "rank": 3, "pid": os.getpid()}
    assert [p.name for p in marker.parent.iterdir()] == ["n1-rank3.json"]  # no temporary left
    (tmp_path / "file").write_text("")
    problem, marker = check_run_dir(tmp_path / "file", 0, "n1")
    assert marker is None
    assert problem.startswith(f"run directory {tmp_path / 'file'} is not writable from {socket.gethostname()} (")


def test_versions():
    found = versions()
    expected = {"python", "torch", "timm", "accelerate", "cuda"} | ({"nccl"} if torch.cuda.is_available() else set())
    assert set(found) == expected
    assert (found["torch"], found["timm"], found["accelerate"]) == (
        torch.__version__,
        timm.__version__,
        accelerate.__version__,
    )


def _report(rank: int, torch_version: str = "2.5.0", **env) -> RankReport:
    facts = {"env": {**DEFAULTS, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), **env}}
    facts |= {"versions": {"torch": torch_version, "nccl": "2.21.5"}, "gpu": "H100", "allreduce_gbps": 1.5}
    return RankReport(rank=rank, host=f"n{rank}", facts={**facts, "wandb": "offline (no key)"})


def test_verdict_table_and_cross_rank_comparisons(capsys):
    assert _verdict([_report(0), _report(1)], 2) == 0
    assert capsys.readouterr().out.splitlines() == [
        "distvit doctor: 2 rank(s)",
        "  rank 0 on n0: local rank 0, H100, torch 2.5.0, nccl 2.21.5, all-reduce 1.5 GB/s, W&B offline (no key): OK",
        "  rank 1 on n1: local rank 1, H100, torch 2.5.0, nccl 2.21.5, all-reduce 1.5 GB/s, W&B offline (no key): OK",
        "distvit doctor: all ranks OK",
    ]
    assert _verdict([_report(0), _report(1, torch_version="2.4.1", MASTER_PORT="29501")], 2) == EXIT_DOCTOR_FAILED
    out = capsys.readouterr().out.splitlines()
    assert "FAILED: ranks disagree on MASTER_ADDR/MASTER_PORT/WORLD_SIZE" in out[1]
    assert out[2].endswith("FAILED: versions differ from rank 0: {'torch': ('2.4.1', '2.5.0')}")
    assert out[3] == "distvit doctor: FAILED on rank(s) [0, 1]"
    assert _verdict([_report(0), _report(0)], 2) == EXIT_DOCTOR_FAILED
    assert "FAILED: ranks [0, 0] are not 0..1 exactly once" in capsys.readouterr().out


def test_a_single_rank_needs_no_process_group(env, tmp_path, capsys):
    assert run_doctor(str(tmp_path / "run"), 5, 1, None) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "distvit doctor: 1 rank(s)" and out[-1] == "distvit doctor: all ranks OK"
    assert out[1].startswith(f"  rank 0 on {socket.gethostname()}: local rank 0, ") and out[1].endswith(": OK")
    assert (tmp_path / "run" / ".doctor" / "single-rank0.json").is_file()


def test_bad_rank_variables_fail_alone_before_any_rendezvous(env, tmp_path, capsys):
    env(RANK="5", WORLD_SIZE="2")
    assert run_doctor(str(tmp_path / "run"), 5, 1, None) == EXIT_DOCTOR_FAILED
    assert capsys.readouterr().out == (
        f"distvit doctor: rank 5 on {socket.gethostname()}: FAILED: RANK=5 is outside WORLD_SIZE=2\n"
    )
    assert not (tmp_path / "run").exists()
