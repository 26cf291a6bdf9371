"""distvit.errors: the exit codes of the user errors; distvit.cli.run_guarded prints them without a traceback."""

from __future__ import annotations

import pytest

from distvit.cli import run_guarded
from distvit.errors import (
    EXIT_PEER_FAILURE,
    EXIT_USER_ERROR,
    CheckpointError,
    ConfigError,
    DataError,
    DistvitError,
    PeerFailure,
    RunFinished,
)


def test_exit_codes():
    assert (EXIT_USER_ERROR, EXIT_PEER_FAILURE) == (2, 4)
    for kind in (DistvitError, ConfigError, DataError, CheckpointError, RunFinished):
        assert kind("x").exit_code == 2, kind
    assert PeerFailure("x").exit_code == 4
    assert all(issubclass(k, DistvitError) for k in (ConfigError, DataError, CheckpointError, RunFinished, PeerFailure))


def _raiser(error: Exception):
    def action():
        raise error

    return action


@pytest.fixture
def leader(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def test_run_guarded_passes_the_action_status_through(leader, capsys):
    assert run_guarded(lambda: None) == 0
    assert run_guarded(lambda: 3) == 3
    assert capsys.readouterr() == ("", "")


def test_run_finished_is_success_with_its_message(leader, capsys):
    assert run_guarded(_raiser(RunFinished("run runs/x already finished"))) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "distvit: run runs/x already finished\n"


@pytest.mark.parametrize("kind", [DistvitError, ConfigError, DataError, CheckpointError])
def test_user_error_is_one_line_and_status_2(leader, capsys, kind):
    assert run_guarded(_raiser(kind("unknown key optim.lrr; did you mean optim.lr?"))) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "distvit: error: unknown key optim.lrr; did you mean optim.lr?\n"
    assert "Traceback" not in err


def test_peer_failure_is_status_4_on_every_rank(monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "1")  # not the node's leader: every rank that notices says so
    assert run_guarded(_raiser(PeerFailure("rank 0 died"))) == 4
    assert capsys.readouterr().err == "distvit: error: rank 0 died\n"


def test_only_the_local_leader_prints_user_errors(monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert run_guarded(_raiser(ConfigError("bad"))) == 2
    assert run_guarded(_raiser(RunFinished("done"))) == 0
    assert capsys.readouterr() == ("", "")


def test_a_bug_keeps_its_traceback(leader):
    with pytest.raises(ZeroDivisionError):
        run_guarded(lambda: 1 / 0)
