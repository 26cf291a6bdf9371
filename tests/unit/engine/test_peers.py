"""distvit.engine.peers: which errors mean a lost peer (the model check across ranks runs in e2e/test_faults)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from distvit.engine.peers import is_peer_failure

PEER_FAILURES = [
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500",
    "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 300000ms for recv operation",
    "[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=12, OpType=ALLREDUCE) ran for 300000 ms",
    "recvBytes: Connection reset by peer",
    "NCCL communicator was aborted on rank 1.",
    "Rank 1 failed to pass monitoredBarrier in 15000 ms",
]


NOT_PEER_FAILURES = [
    "CUDA out of memory. Tried to allocate 20.00 MiB",
    "timeout while writing /shared/run/checkpoints/step_00000010.pt",
    "[Errno 110] Connection timed out",
    "[Errno 111] Connection refused",
    "the read operation timed out",
]


def test_is_peer_failure():
    assert [is_peer_failure(RuntimeError(m)) for m in PEER_FAILURES] == [True] * len(PEER_FAILURES)
    assert [is_peer_failure(RuntimeError(m)) for m in NOT_PEER_FAILURES] == [False] * len(NOT_PEER_FAILURES)
    assert not any(is_peer_failure(TimeoutError(m)) for m in NOT_PEER_FAILURES)
    assert is_peer_failure(dist.DistError("any message"))  # torch.distributed's own error types
    assert is_peer_failure(dist.DistNetworkError("any message"))


def test_rank_zeros_error_is_raised_by_every_rank_that_waits_for_it():
    """One process: wait_for_main passes, or raises rank 0's error (the same message every rank gets)."""
    from distvit.engine.peers import PeerMonitor
    from distvit.errors import DistvitError

    monitor = PeerMonitor(world_size=1, timeout_s=10)
    monitor.wait_for_main()
    monitor.wait_for_main(None)
    with pytest.raises(DistvitError, match="^writing x failed$"):
        monitor.wait_for_main("writing x failed")
