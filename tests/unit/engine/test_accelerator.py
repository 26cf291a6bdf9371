"""distvit.engine.accelerator: CPU ranks, mixed precision, DDP options, compile support."""

from __future__ import annotations

import os

import torch

from distvit.config import Config, load_config
from distvit.engine import accelerator as accelerator_module
from distvit.engine.accelerator import (
    compile_supported,
    cpu_processes,
    ddp_options,
    resolve_mixed_precision,
    shared_gpu_backend,
    wait_for_everyone,
)
from distvit.model.build import nothing_frozen
from tests.support.helpers import REPO


def test_precision_auto_and_ddp_options(monkeypatch):
    from distvit.engine.accelerator import ddp_options, resolve_mixed_precision

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resolve_mixed_precision("auto") == (
        "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    )
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # `accelerate launch --mixed_precision fp16`
    assert resolve_mixed_precision("auto") == "fp16" and resolve_mixed_precision("no") == "no"
    every = load_config(REPO / "configs/demo.yaml", check_data=False)
    assert ddp_options(nothing_frozen(every.surgery), 1) == {"static_graph": True, "gradient_as_bucket_view": True}
    # pytorch#143580: no static graph with accumulation
    assert ddp_options(True, 2) == {"static_graph": False, "gradient_as_bucket_view": True}
    for frozen in ("surgery.freeze=backbone", "surgery.freeze=blocks:2", "surgery.freeze_embeddings=true"):
        cfg = load_config(REPO / "configs/demo.yaml", [frozen], check_data=False)
        assert ddp_options(nothing_frozen(cfg.surgery), 1) == {"static_graph": False, "gradient_as_bucket_view": False}


def no_gpu(monkeypatch, cuda: bool = False) -> None:
    """Make this machine look like one without (or with) a CUDA GPU, and without an XPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "is_available", lambda: False)


def test_cpu_processes_needs_several_ranks_and_no_gpu(monkeypatch):
    no_gpu(monkeypatch)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cpu_processes() is False
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cpu_processes() is False
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cpu_processes() is True  # accelerate launch --multi_gpu on a CPU machine: gloo
    no_gpu(monkeypatch, cuda=True)
    assert cpu_processes() is False


def test_ranks_sharing_a_gpu_use_gloo(monkeypatch):
    """NCCL refuses two ranks on one GPU: more local ranks than GPUs means gloo, passed to Accelerate."""
    no_gpu(monkeypatch, cuda=True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert shared_gpu_backend() == "gloo"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert shared_gpu_backend() is None  # one rank per GPU: Accelerate's NCCL
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert shared_gpu_backend() is None
    no_gpu(monkeypatch)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert shared_gpu_backend() is None  # CPU ranks: gloo through Accelerate's cpu=True already

    no_gpu(monkeypatch, cuda=True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_BYPASS_DEVICE_MAP", "false")  # recorded: restored after the test
    captured = {}

    class Recorder:
        num_processes = 2

        def __init__(self, **kwargs):
            captured.update(kwargs)

        def print(self, *args):
            captured["printed"] = " ".join(args)

    monkeypatch.setattr(accelerator_module, "Accelerator", Recorder)
    monkeypatch.setattr(accelerator_module, "resolve_mixed_precision", lambda setting: "no")
    cfg = load_config(REPO / "configs/demo.yaml", check_data=False)
    accelerator_module.make_accelerator(cfg.train, log_with=None, nothing_frozen=True)
    group = next(h for h in captured["kwargs_handlers"] if type(h).__name__ == "InitProcessGroupKwargs")
    assert group.backend == "gloo" and group.to_kwargs()["backend"] == "gloo"
    assert "2 ranks share 1 GPU(s)" in captured["printed"] and "gloo" in captured["printed"]
    assert os.environ["ACCELERATE_BYPASS_DEVICE_MAP"] == "true"  # DDP without device_ids=[local rank]


def test_ranks_sharing_a_gpu_wait_with_a_plain_barrier(monkeypatch):
    """Accelerate's barrier names GPU `local rank`, which does not exist where ranks share one GPU."""
    import torch.distributed as dist

    calls = []

    class Ranks:
        num_processes = 2

        def wait_for_everyone(self):
            calls.append("accelerate")

    monkeypatch.setattr(dist, "barrier", lambda: calls.append("plain"))
    monkeypatch.setattr(accelerator_module, "shared_gpu_backend", lambda: "gloo")
    wait_for_everyone(Ranks())
    monkeypatch.setattr(accelerator_module, "shared_gpu_backend", lambda: None)
    wait_for_everyone(Ranks())
    assert calls == ["plain", "accelerate"]


def test_resolve_mixed_precision(monkeypatch):
    no_gpu(monkeypatch)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert [resolve_mixed_precision(s) for s in ("no", "bf16", "fp16")] == ["no", "bf16", "fp16"]  # explicit: as given
    assert resolve_mixed_precision("auto") == "no"  # CPU: fp32
    for launcher in ("bf16", "fp16"):
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
        assert resolve_mixed_precision("auto") == launcher and resolve_mixed_precision("no") == "no"
    for ignored in ("no", "fp8"):
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", ignored)
        assert resolve_mixed_precision("auto") == "no"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    no_gpu(monkeypatch, cuda=True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    assert resolve_mixed_precision("auto") == "bf16"  # Ampere and later: native bf16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    assert resolve_mixed_precision("auto") == "no"  # emulated bf16 is slow: fp32


def test_ddp_options_follow_freezing_and_accumulation():
    def options(freeze="none", embeddings=False, accumulate=1):
        cfg = Config()
        cfg.surgery.freeze, cfg.surgery.freeze_embeddings = freeze, embeddings
        return ddp_options(nothing_frozen(cfg.surgery), accumulate)

    assert options() == {"static_graph": True, "gradient_as_bucket_view": True}
    assert options(accumulate=4) == {"static_graph": False, "gradient_as_bucket_view": True}
    for frozen in (options("backbone"), options("blocks:2", accumulate=2), options(embeddings=True)):
        assert frozen == {"static_graph": False, "gradient_as_bucket_view": False}


def test_compile_supported_says_why_not(monkeypatch):
    import torch._dynamo

    supported, reason = compile_supported()
    assert isinstance(supported, bool) and isinstance(reason, str) and (reason == "") is supported
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    assert compile_supported() == (False, "torch.compile is not supported on this Python/platform")

    def broken():
        raise RuntimeError("no dynamo here")

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", broken)
    assert compile_supported() == (False, "torch.compile is unavailable (RuntimeError: no dynamo here)")


def test_cpu_threads_are_the_nodes_cores_shared_by_its_ranks(monkeypatch):
    import torch

    from distvit.config import load_config
    from distvit.data.node import usable_cores
    from distvit.engine.accelerator import size_cpu_threads

    before = torch.get_num_threads()
    try:
        cfg = load_config(None, [], check_data=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        note = size_cpu_threads(cfg.train, torch.device("cpu"))
        assert torch.get_num_threads() == usable_cores()  # not the launcher's OMP_NUM_THREADS=1
        assert note == f"; {usable_cores()} torch thread(s) per rank ({usable_cores()} cores / 1 rank(s) on this node)"
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(usable_cores() * 4))
        size_cpu_threads(cfg.train, torch.device("cpu"))
        assert torch.get_num_threads() == 1
        cfg.train.cpu_threads = 3
        assert size_cpu_threads(cfg.train, torch.device("cpu")).endswith("(train.cpu_threads)")
        assert torch.get_num_threads() == 3
        torch.set_num_threads(before)
        assert size_cpu_threads(cfg.train, torch.device("cuda")) == "" and torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
