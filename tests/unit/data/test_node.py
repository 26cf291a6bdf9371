"""distvit.data.node: the launcher's environment, read in one place and when asked."""

from __future__ import annotations

import os

from distvit.data.node import Launch, is_local_leader, launch, local_ranks, session_id

VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RESTART_COUNT")


def test_without_a_launcher_a_process_is_rank_0_of_1(monkeypatch):
    for name in (*VARIABLES, "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    assert launch() == Launch()
    assert launch().local_leader and is_local_leader() and local_ranks() == (0, 1)
    assert session_id() == str(os.getpid())  # no launcher: the session is this process


def test_the_launchers_variables_as_they_are_when_asked(monkeypatch):
    for name, value in zip(VARIABLES, ("5", "8", "1", "4", "2")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert launch() == Launch(5, 8, 1, 4, launched=True, restart="2", mixed_precision="bf16")
    assert not is_local_leader() and local_ranks() == (1, 4)
    assert session_id() == str(os.getppid())  # the local ranks of one launch share their launcher
    monkeypatch.setenv("LOCAL_RANK", "0")  # read again at every call
    assert is_local_leader() and launch().local_rank == 0
