"""Process-level setup the engine needs: the Accelerator, per-step seeds, model checks across ranks,
RNG state, fused attention and torch.compile with graceful fallbacks."""

from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, gather_object

from distvit.config import Config
from distvit.errors import ConfigError, DistvitError
from distvit.model.record import SurgeryRecord


def step_seed(seed: int, epoch: int, first_slot: int) -> int:
    """Seed of one step's augmentation: a function of (seed, epoch, position in the epoch) only."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, first_slot]).generate_state(1)[0])


def cpu_processes() -> bool:
    """Several ranks and no GPU: Accelerate must be told `cpu=True` to set up gloo (MULTI_CPU); without
    it every rank of `accelerate launch --multi_gpu` on a CPU machine runs alone as rank 0."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    return several and not gpu


def make_accelerator(cfg: Config) -> Accelerator:
    # NCCL: on a collective timeout, abort the communicators and raise in the training thread (2) rather
    # than tear the process down from the watchdog (3, torch's default), so the unresponsive ranks can
    # be named (PeerMonitor). A value set by the user wins.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    accelerator = Accelerator(
        cpu=cpu_processes(),
        mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
        log_with="wandb" if cfg.tracking.backend == "wandb" else None,
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.timeout_s)),
            DistributedDataParallelKwargs(**ddp_options(cfg)),
        ],
    )
    world, micro = accelerator.num_processes, cfg.train.grad_accum_steps
    if cfg.train.batch_size % (world * micro) or cfg.train.eval_batch_size % world:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} and train.eval_batch_size={cfg.train.eval_batch_size} are "
            f"global batch sizes: batch_size must be divisible by the number of processes x grad_accum_steps "
            f"({world} x {micro}) and eval_batch_size by the number of processes ({world}). "
            f"Choose multiples of {world * micro}."
        )
    return accelerator


def resolve_mixed_precision(setting: str) -> str:
    """The precision for `train.mixed_precision`: an explicit no/bf16/fp16 as given; auto takes the
    launcher's bf16/fp16 if it asks for one, else bf16 where the GPU supports it, else no. (CPU autocast
    to bf16 is slower than fp32 on most CPUs.)"""
    if setting != "auto":
        return setting
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher in ("bf16", "fp16"):
        return launcher
    if torch.cuda.is_available() and not cpu_processes() and _native_bf16():
        return "bf16"
    return "no"


def _native_bf16() -> bool:
    """bf16 tensor cores (compute capability 8.0+, Ampere on); older GPUs only emulate bf16, slowly."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    return torch.cuda.get_device_capability(local_rank) >= (8, 0)


def ddp_options(cfg: Config) -> dict[str, bool]:
    """DDP settings that suit a ViT whose every parameter trains: `static_graph` (one bucket plan,
    found in the first step; off with accumulation, where `no_sync` breaks it: pytorch#143580) and
    `gradient_as_bucket_view` (gradients live in the all-reduce buckets: no copy, less memory). Frozen
    parameters are left to DDP's defaults."""
    nothing_frozen = cfg.surgery.freeze == "none" and not cfg.surgery.freeze_embeddings
    return {
        "static_graph": nothing_frozen and cfg.train.grad_accum_steps == 1,
        "gradient_as_bucket_view": nothing_frozen,
    }


def check_same_model_everywhere(record: SurgeryRecord) -> None:
    """All ranks compare their post-surgery fingerprints before DDP wraps the model (its broadcast from
    rank 0 would hide a difference in the weights, though not in the plan or in what is frozen)."""
    prints = gather_object([record.fingerprint])
    differing = [rank for rank, value in enumerate(prints) if value != prints[0]]
    if differing:
        raise DistvitError(
            f"the model after surgery differs between ranks: rank(s) {differing} disagree with rank 0 "
            f"(fingerprints {', '.join(p[:12] for p in prints)}). Every rank must see the same config, "
            f"weights file and library versions (timm {record.timm_version} here)."
        )


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def compile_supported() -> tuple[bool, str]:
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return False, "torch.compile is not supported on this Python/platform"
    except Exception as err:  # missing or broken dynamo
        return False, f"torch.compile is unavailable ({type(err).__name__}: {err})"
    return True, ""


MAIN_PROCESS_WORK_TIMEOUT = timedelta(hours=1)
"""How long the other ranks wait for rank-0-only work (checkpoint writes, W&B start, plots)."""


class PeerMonitor:
    """A separate gloo group (CPU, whatever the training backend) for two jobs the training collectives
    must not do: waiting for rank-0-only work without tripping train.timeout_s (a slow checkpoint write
    is not a hung rank), and naming the ranks that stopped responding when a collective fails (the
    healthy ranks enter a monitored barrier; rank 0 learns which never did)."""

    def __init__(self, world_size: int, timeout_s: int):
        import torch.distributed as dist

        several = world_size > 1 and dist.is_initialized()
        # First a group with the training timeout: if gloo cannot connect (say, a host name that resolves
        # to a loopback address on a multi-node job) this fails within train.timeout_s, before the
        # long-timeout group for rank-0 waits could hang for an hour.
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if several else None
        self.wait_group = dist.new_group(backend="gloo", timeout=MAIN_PROCESS_WORK_TIMEOUT) if several else None

    def wait_for_main(self) -> None:
        """Every rank waits here while rank 0 finishes its own work (up to MAIN_PROCESS_WORK_TIMEOUT)."""
        if self.wait_group is not None:
            import torch.distributed as dist

            dist.barrier(group=self.wait_group)

    def unresponsive(self, seconds: float = 15.0) -> str:
        """A description of the unresponsive ranks, as far as this rank can tell."""
        if self.group is None:
            return ""
        import torch.distributed as dist

        try:
            dist.monitored_barrier(group=self.group, timeout=timedelta(seconds=seconds), wait_all_ranks=True)
        except Exception as err:  # its message names the ranks that did not arrive
            return str(err).splitlines()[0][:300]
        return "all ranks answered a barrier afterwards"


def is_peer_failure(err: BaseException) -> bool:
    """A collective that timed out or lost its peers (gloo and NCCL report these in several ways); not
    any error that mentions a timeout (a slow file system on one rank is not a lost peer)."""
    import torch.distributed as dist

    text = str(err).lower()
    markers = (
        "timed out waiting",
        "watchdog caught collective operation timeout",
        "connection closed by peer",
        "connection reset by peer",
        "nccl communicator was aborted",
        "failed to pass monitoredbarrier",
    )
    return isinstance(err, dist.DistError) or any(marker in text for marker in markers)
