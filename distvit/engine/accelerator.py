"""The process's Accelerator and what it may use: gloo on CPU-only ranks, the mixed precision, DDP's
options, and whether torch.compile can run here. Reads the train section's process settings (precision,
timeout, threads, the global batch's split over ranks and micro-batches)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

from distvit.config import TrainConfig
from distvit.data.node import launch
from distvit.errors import ConfigError


def cpu_processes() -> bool:
    """Several ranks and no GPU: Accelerate must be told `cpu=True` to set up gloo (MULTI_CPU); without
    it every rank of `accelerate launch --multi_gpu` on a CPU machine runs alone as rank 0."""
    several = launch().world_size > 1
    gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    return several and not gpu


def make_accelerator(cfg: TrainConfig, *, log_with: str | None, nothing_frozen: bool) -> Accelerator:
    """`log_with`: Accelerate's tracker (the tracking section's backend); `nothing_frozen`: every parameter
    trains (the surgery section), which DDP's options depend on."""
    # NCCL: on a collective timeout, abort the communicators and raise in the training thread (2) rather
    # than tear the process down from the watchdog (3, torch's default), so the unresponsive ranks can
    # be named (PeerMonitor). A value set by the user wins.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    accelerator = Accelerator(
        cpu=cpu_processes(),
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
        log_with=log_with,
        kwargs_handlers=[
            process_group_options(cfg.timeout_s),
            DistributedDataParallelKwargs(**ddp_options(nothing_frozen, cfg.grad_accum_steps)),
        ],
    )
    world, micro = accelerator.num_processes, cfg.grad_accum_steps
    if cfg.batch_size % (world * micro):
        raise ConfigError(
            f"train.batch_size={cfg.batch_size} is a global batch size: it must be divisible by the number of "
            f"processes x grad_accum_steps ({world} x {micro}). Choose a multiple of {world * micro}."
        )
    if shared_gpu_backend():
        # Accelerate would give DDP `device_ids=[local rank]`, a GPU that does not exist here; without
        # device_ids DDP uses the module's own device.
        os.environ["ACCELERATE_BYPASS_DEVICE_MAP"] = "true"
        accelerator.print(
            f"distvit: note: {launch().local_world_size} ranks share {torch.cuda.device_count()} GPU(s) on this "
            "node: NCCL cannot put two ranks on one GPU, so they communicate through gloo (slower; for tests). "
            "Launch one rank per GPU for speed."
        )
    return accelerator


def process_group_options(timeout_s: int | None = None) -> InitProcessGroupKwargs:
    """The process group's timeout, and gloo where ranks share a GPU (see shared_gpu_backend)."""
    backend = shared_gpu_backend()
    options: dict = {"backend": backend} if backend else {}
    if timeout_s is not None:
        options["timeout"] = timedelta(seconds=timeout_s)
    return InitProcessGroupKwargs(**options)


def shared_gpu_backend() -> str | None:
    """gloo where this node has more ranks than GPUs (Accelerate then places rank i on GPU i mod count):
    NCCL refuses two ranks on one device, gloo carries CUDA tensors. None: Accelerate's own choice."""
    local_ranks = launch().local_world_size
    if local_ranks > 1 and torch.cuda.is_available() and local_ranks > torch.cuda.device_count():
        return "gloo"
    return None


def wait_for_everyone(accelerator: Accelerator) -> None:
    """Accelerate's barrier, except where ranks share a GPU: Accelerate passes `device_ids=[local rank]`,
    and a barrier then allocates on a GPU that does not exist; a plain barrier uses gloo's own device."""
    if accelerator.num_processes > 1 and shared_gpu_backend():
        import torch.distributed as dist

        dist.barrier()
    else:
        accelerator.wait_for_everyone()


def resolve_mixed_precision(setting: str) -> str:
    """The precision for `train.mixed_precision`: an explicit no/bf16/fp16 as given; auto takes the
    launcher's bf16/fp16 if it asks for one, else bf16 where the GPU supports it, else no. (CPU autocast
    to bf16 is slower than fp32 on most CPUs.)"""
    if setting != "auto":
        return setting
    launcher = launch().mixed_precision
    if launcher in ("bf16", "fp16"):
        return launcher
    if torch.cuda.is_available() and not cpu_processes() and _native_bf16():
        return "bf16"
    return "no"


def _native_bf16() -> bool:
    """bf16 tensor cores (compute capability 8.0+, Ampere on); older GPUs only emulate bf16, slowly."""
    local_rank = launch().local_rank % torch.cuda.device_count()
    return torch.cuda.get_device_capability(local_rank) >= (8, 0)


def ddp_options(nothing_frozen: bool, micro_batches: int) -> dict[str, bool]:
    """DDP settings that suit a ViT whose every parameter trains: `static_graph` (one bucket plan,
    found in the first step; off with accumulation, where `no_sync` breaks it: pytorch#143580) and
    `gradient_as_bucket_view` (gradients live in the all-reduce buckets: no copy, less memory). Frozen
    parameters are left to DDP's defaults."""
    return {"static_graph": nothing_frozen and micro_batches == 1, "gradient_as_bucket_view": nothing_frozen}


def compile_supported() -> tuple[bool, str]:
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return False, "torch.compile is not supported on this Python/platform"
    except Exception as err:  # missing or broken dynamo
        return False, f"torch.compile is unavailable ({type(err).__name__}: {err})"
    return True, ""


def size_cpu_threads(cfg: TrainConfig, device: torch.device) -> str:
    """On CPU, set torch's intra-op threads per rank (train.cpu_threads, else the node's usable cores
    shared by its ranks: accelerate launch sets OMP_NUM_THREADS=1 when it is unset, which leaves one core
    working per rank); what was chosen and why, for the start line. On a GPU nothing changes."""
    if device.type != "cpu":
        return ""
    from distvit.data.node import local_ranks, usable_cores

    local = local_ranks()[1]
    threads = cfg.cpu_threads or max(1, usable_cores() // local)
    torch.set_num_threads(threads)
    why = "train.cpu_threads" if cfg.cpu_threads else f"{usable_cores()} cores / {local} rank(s) on this node"
    return f"; {threads} torch thread(s) per rank ({why})"
