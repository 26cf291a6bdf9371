"""The run configuration's schema: one dataclass per section, with types, bounds and choices declared on
the fields (checked by pydantic when the config is loaded, see `distvit.config.loading`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional, Union

import yaml

try:
    import pydantic
    from pydantic import Field
except ImportError:  # `launch/gpu_check.py` runs where only torch, torchvision, timm and accelerate are installed
    pydantic = None

    def Field(**constraints: Any) -> tuple:  # noqa: N802 - stands in for pydantic.Field (hashable, as typing needs)
        return tuple(sorted(constraints.items()))


# strict: an integer key takes an integer, not 1e23, 2.0 or true (which pydantic would otherwise convert)
PositiveInt = Annotated[int, Field(gt=0, strict=True)]
NonNegativeInt = Annotated[int, Field(ge=0, strict=True)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, lt=1)]
Seed = Annotated[int, Field(ge=0, lt=2**32, strict=True)]


@dataclass
class RunConfig:
    dir: str = ""
    """Run directory (config.yaml, metrics.jsonl, checkpoints/). Empty: runs/<config file stem>."""
    overwrite: bool = False
    """Allow starting a new run in a directory that already holds one (its files are replaced)."""


@dataclass
class ModelConfig:
    name: str = "deit_tiny_patch16_224"
    """A timm model name (VisionTransformer family)."""
    pretrained: Union[bool, str] = False
    """true: timm's hub weights; false: random init; a path: local weights file (.pth/.bin/.safetensors)."""
    fused_attn: Optional[bool] = None
    """Fused attention (F.scaled_dot_product_attention). Empty: timm's default (on where available);
    true where unavailable falls back to the plain implementation with a warning."""


@dataclass
class SurgeryConfig:
    img_size: Optional[PositiveInt] = None
    """Model input size in pixels. Empty: the model's native size."""
    patch_size: Optional[PositiveInt] = None
    """Patch size in pixels. Empty: the model's native patch size."""
    head: Literal["reinit", "keep"] = "reinit"
    """reinit: new classifier for the dataset's classes; keep: the model's head (class counts must match)."""
    pos_embed: Literal["interpolate", "truncate", "reinit", "dynamic"] = "interpolate"
    """How position embeddings follow a new token grid: interpolate (bicubic, from the original weights),
    truncate (the lesson's pos_embed[:, :prefix + tokens], for comparison), reinit (fresh), dynamic
    (resampled to the input size at every forward)."""
    freeze: Annotated[str, Field(pattern=r"^(none|backbone|blocks:[0-9]+)$")] = "none"
    """none; backbone (only the head trains, as in the lesson); blocks:K (embeddings and all but the last K
    blocks frozen)."""
    freeze_embeddings: bool = False
    """Also freeze patch embedding, position embedding and prefix tokens (implied by backbone and blocks:K)."""
    drop_path: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Stochastic depth rate."""
    lr_decay: Annotated[float, Field(gt=0, le=1)] = 1.0
    """Layer-wise lr decay (timm's grouping): the head trains at optim.lr, block i of L at lr * decay^(L - i)
    (the final norm with the last block), embeddings at lr * decay^(L + 1). 1.0: one lr for all."""


@dataclass
class DataConfig:
    path: str = ""
    """Dataset folder holding manifest.json and the shards (made by `distvit prepare`)."""
    train_split: str = "train"
    """The manifest's split to train on."""
    eval_split: str = "test"
    """The manifest's split that evaluations during training (and `distvit evaluate` by default) run on."""
    mode: Literal["auto", "memory", "stream"] = "auto"
    """memory: decode the split once and keep it on the training device; stream: read and decode from the
    shards in loader workers each epoch; auto: memory when the decoded split fits in a third of the host's
    available memory and, on a GPU, in a quarter of its memory. Decoded once per node (see shared_split)."""
    num_workers: Optional[Annotated[int, Field(ge=0, le=64, strict=True)]] = None
    """Decoding processes per rank in stream mode (0: in the training process). Empty: the node's usable
    cores / its ranks, at most 8 (the training process keeps one). At most 64: each is a process with its
    own interpreter, shard handles and 4 batches read ahead, and more than the cores only contend."""
    decode: Literal["auto", "workers", "device"] = "auto"
    """Stream mode: decode in the loader workers, or (JPEG shards of one size) only read there and decode
    each batch on the training device (nvJPEG on a GPU). auto: device on a GPU where it applies."""
    remote: str = ""
    """Where the shards live if not in data.path: a URL or `pipe:` command template with {name} (e.g.
    'pipe:aws s3 cp s3://bucket/ds/{name} -'); missing or damaged files are fetched into data.path first."""
    cache_dir: str = ""
    """With data.remote: stream the shards through this node-local folder instead of copying the dataset
    into data.path first (data.path then holds only the manifest). Shards are fetched as the epoch plan
    needs them and evicted when no rank of the node needs them again; needs data.cache_limit."""
    cache_limit: NonNegativeInt = 0
    """Bytes the cache may hold (shards, their indexes and fetches under way); checked against what a
    pass needs at once (a clear error when too small)."""
    fetch_timeout_s: PositiveFloat = 30.0
    """Seconds a fetch from data.remote may take to connect (http/https) before the try counts as failed."""
    fetch_stall_s: PositiveFloat = 60.0
    """Seconds without a byte from data.remote (waiting for the answer or in the middle of it; a pipe:
    command's output) after which a try is given up (the command is stopped)."""
    fetch_retries: NonNegativeInt = 3
    """Further tries of a fetch that failed on the way (refused, stalled, cut, server error, a failed pipe:
    command), after a short pause each; then one error says what each try met."""
    shuffle: Literal["auto", "global", "window"] = "auto"
    """Epoch order. global: a permutation of all samples; window: shards in a random order, samples
    shuffled within windows of data.shuffle_window shards (a cache then holds about two windows);
    auto: window when streaming through data.cache_dir, else global."""
    shuffle_window: PositiveInt = 16
    """Shards per window of data.shuffle=window: more mixes better and needs a larger cache."""
    verify: Literal["sha256", "size"] = "sha256"
    """Preflight of the shards before training: sha256 and size (default), or size only (huge datasets)."""
    preflight_timeout_s: PositiveInt = 3600
    """How long the other ranks of a node wait for its leader's preflight hashing (not train.timeout_s:
    hashing a large dataset is not a hung rank)."""
    bad_shards: Literal["error", "skip"] = "error"
    """A missing, truncated or corrupted shard: stop with an error, or leave it out (same shards on all ranks)."""
    trace_samples: bool = False
    """Record the sample indices every rank trains on, per step, in RUN_DIR/trace/rank<N>.jsonl."""
    train_subset: NonNegativeInt = 0
    """Train on a fixed random subset of this many images of the train split (seeded by train.seed;
    the lesson's 10k). 0: the whole split."""


Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


@dataclass
class AugmentConfig:
    """The training augmentation: a preset, and its parts (an empty part takes the preset's value)."""

    preset: Literal["none", "lesson", "crop_flip", "deit"] = "crop_flip"
    """Training augmentation preset, applied on the training device (the keys below change its parts):
    none; lesson (the lesson's: none, resize only); crop_flip (random crop with padding + horizontal flip);
    deit (DeiT's recipe: random-resized crop, flip, RandAugment m9 std 0.5, random erasing 0.25, 3 repeats)."""
    crop_padding: NonNegativeInt = 4
    """Padding (pixels at stored size) of the random crop (augment.crop=pad)."""
    crop: Optional[Literal["none", "pad", "resized"]] = None
    """pad: random crop of the stored image zero-padded by augment.crop_padding; resized: random-resized crop
    (an area of crop_scale_min..1 of the image, aspect 3/4..4/3) straight to the model's input size."""
    crop_scale_min: Optional[Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]] = None
    """Smallest area fraction a random-resized crop keeps (DeiT: 0.08)."""
    hflip: Optional[Probability] = None
    """Probability of a horizontal flip (0 for data whose meaning a flip changes: digits, text)."""
    color_jitter: Optional[Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]] = None
    """Strength s of colour jitter: brightness, contrast and saturation factors in [1 - s, 1 + s] (0: off)."""
    color_jitter_prob: Optional[Probability] = None
    """Probability that an image is colour-jittered."""
    randaugment_ops: Optional[Annotated[int, Field(ge=0, le=4, strict=True)]] = None
    """RandAugment: operations drawn per image (0: off; DeiT: 2)."""
    randaugment_magnitude: Optional[Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)]] = None
    """RandAugment magnitude on timm's 0..10 scale (DeiT: 9)."""
    randaugment_std: Optional[NonNegativeFloat] = None
    """Per-operation spread of the magnitude (normal, clipped to 0..10; DeiT: 0.5)."""
    randaugment_prob: Optional[Probability] = None
    """Probability that each drawn operation is applied (timm: 0.5)."""
    erasing: Optional[Probability] = None
    """Probability of random erasing: a box of 2-33 % of the image filled with normal noise (DeiT: 0.25)."""
    repeats: Optional[Annotated[int, Field(ge=1, le=16, strict=True)]] = None
    """Repeated augmentation: every sample appears this many times per epoch, each time augmented anew
    (DeiT: 3); an epoch is that many times longer."""


@dataclass
class MixConfig:
    """Mixup and CutMix, drawn per step on the training device (read by the step's mixing)."""

    mixup_alpha: NonNegativeFloat = 0.0
    """Mixup Beta(alpha, alpha) on the training device (0: off)."""
    cutmix_alpha: NonNegativeFloat = 0.0
    """CutMix Beta(alpha, alpha) on the training device (0: off)."""
    prob: Annotated[float, Field(ge=0, le=1)] = 1.0
    """Share of steps that mix (when mixup or cutmix is on)."""
    switch_prob: Annotated[float, Field(ge=0, le=1)] = 0.5
    """With both on: share of mixing steps that use CutMix instead of Mixup."""


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    """The optimizer: AdamW (fused on a GPU), or SGD with momentum."""
    lr: PositiveFloat = 5e-4
    """Peak learning rate."""
    min_lr: NonNegativeFloat = 0.0
    """Learning rate at the end of the cosine schedule."""
    weight_decay: NonNegativeFloat = 0.05
    """Decoupled weight decay (AdamW) or L2 penalty (SGD); biases, norms, position embeddings and tokens get none."""
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    """SGD momentum (sgd only)."""
    betas: tuple[Fraction, Fraction] = (0.9, 0.999)
    """AdamW betas (adamw only)."""
    fused: Optional[bool] = None
    """Fused AdamW kernel (one kernel for all parameters; on CPU ~2x faster than foreach). Empty: on where
    torch has one (CUDA, CPU); true where unsupported falls back with a warning."""
    lr_scale: Literal["none", "linear", "sqrt"] = "none"
    """Scale optim.lr (and min_lr) by the global batch: lr * (batch / lr_base_batch) for linear, its
    square root for sqrt (DeiT: linear with base 512). The effective lr is printed at start."""
    lr_base_batch: PositiveInt = 512
    """The global batch optim.lr is given for (with lr_scale linear or sqrt)."""
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    """After warmup: cosine to min_lr, step (multiply by step_gamma at each of step_epochs), or constant."""
    step_epochs: list[PositiveFloat] = field(default_factory=list)
    """Epochs (fractions allowed) at which the step schedule multiplies the lr by step_gamma."""
    step_gamma: Annotated[float, Field(gt=0, le=1)] = 0.1
    """The factor the step schedule multiplies the lr by at each of step_epochs."""
    warmup_epochs: NonNegativeFloat = 0.0
    """Linear warmup length, in epochs (fractions allowed)."""
    clip_grad_norm: NonNegativeFloat = 0.0
    """Clip the global gradient norm to this value before each optimizer step (0: off)."""


@dataclass
class TrainConfig:
    epochs: PositiveInt = 1
    """Passes over the training split (or data.train_subset), every image once per epoch."""
    batch_size: PositiveInt = 128
    """Global batch size: split evenly over the ranks, so results do not depend on the world size."""
    seed: Seed = 0
    """Seeds the new layers' initialisation, the epoch order and every augmentation draw: the same seed and
    settings give the same run on any world size."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """no / bf16 / fp16 (with loss scaling). auto: what `accelerate launch --mixed_precision` (or accelerate
    config) says if it asks for bf16 or fp16, else bf16 on a GPU that supports it, else no (fp32)."""
    log_every: PositiveInt = 10
    """Write a training line to metrics.jsonl every N optimizer steps."""
    cpu_threads: NonNegativeInt = 0
    """Torch intra-op threads per rank when training on CPU. 0: the usable cores / the ranks on the node
    (a launcher's OMP_NUM_THREADS=1 would leave one core per rank busy and the rest idle)."""
    resume: str = ""
    """Empty: a new run; 'auto': continue from RUN_DIR's newest checkpoint if it has one; or a checkpoint file."""
    stop_at_step: NonNegativeInt = 0
    """Checkpoint and stop after this optimizer step (0: run to the end); continue with train.resume=auto."""
    grad_accum_steps: PositiveInt = 1
    """Split each rank's share of the global batch into this many micro-batches (same optimizer steps,
    less memory); batch_size must be divisible by processes x grad_accum_steps."""
    label_smoothing: Fraction = 0.0
    """Cross-entropy label smoothing: the target puts this much probability evenly over all classes."""
    timeout_s: Annotated[int, Field(ge=10)] = 300
    """Seconds a rank waits in a collective (all-reduce, barrier) before the run stops with an error
    naming the unresponsive rank(s); NCCL's default is 30 minutes. Must exceed the longest rank-0-only
    pause (checkpoint write, W&B start)."""
    compile: Optional[bool] = None
    """torch.compile the model (compile time is reported; falls back to eager with a warning where it
    fails). Empty: on for CUDA, off on CPU (where compiling takes longer than short runs save)."""
    cache_features: Optional[bool] = None
    """Head-only fine-tuning (surgery.freeze=backbone, no augmentation, mixing, drop-path or distillation):
    compute the frozen backbone's features once and train the head on them. Empty: whenever possible;
    true: required (an error says what prevents it); false: full forward every step."""


@dataclass
class EvalConfig:
    """Evaluation during training (read by the evaluator; the split is data.eval_split)."""

    every: NonNegativeInt = 1
    """Evaluate every N epochs (0: only after the last epoch; the last epoch is always evaluated)."""
    batch_size: PositiveInt = 512
    """Global batch size of evaluation (and of the backbone pass that caches features for head-only runs)."""


@dataclass
class TrackingConfig:
    backend: Literal["wandb", "none"] = "wandb"
    """wandb: track the run in Weights & Biases (offline when no login or network, see mode); none: only
    the run folder's metrics.jsonl and plots."""
    project: str = "distvit"
    """W&B project."""
    entity: Optional[str] = None
    """W&B team or user. Empty: the logged-in user's default entity."""
    run_name: Optional[str] = None
    """W&B run name. Empty: the run directory's name."""
    mode: Literal["auto", "online", "offline"] = "auto"
    """auto: online when an API key is configured, else offline (sync later with `wandb sync`)."""


@dataclass
class EmaConfig:
    enabled: bool = False
    """Keep an exponential moving average of the weights, evaluated beside the raw model."""
    decay: Optional[Annotated[float, Field(gt=0, lt=1)]] = None
    """Per-optimizer-step decay. Empty: derived from the run length, 1 - 1 / (horizon x total steps)."""
    horizon: Annotated[float, Field(gt=0, le=1)] = 0.1
    """With decay empty: the EMA's time constant as a share of the run's optimizer steps."""
    warmup: bool = True
    """Use min(decay, (1 + t) / (10 + t)) at step t, so early weights do not dominate."""


@dataclass
class DistillConfig:
    type: Literal["none", "soft", "hard"] = "none"
    """Knowledge distillation as in DeiT: soft (KL at temperature tau) or hard (teacher's argmax)."""
    teacher: str = ""
    """A distvit checkpoint or run directory, or a timm model name (with teacher_weights)."""
    teacher_weights: Union[bool, str] = True
    """For a timm model name: true (hub weights) or a local weights file whose head has the dataset's classes."""
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.5
    """Loss = (1 - alpha) x label loss + alpha x distillation loss."""
    tau: PositiveFloat = 1.0
    """Temperature of the soft distillation term."""


@dataclass
class CheckpointConfig:
    every_epochs: NonNegativeInt = 1
    """Also checkpoint every N epochs (0: only the final checkpoint). On by default: a kill loses at most
    an epoch's work (add every_steps for long epochs)."""
    every_steps: NonNegativeInt = 0
    """Also checkpoint every N optimizer steps (0: off), mid-epoch included."""
    every_minutes: NonNegativeFloat = 30.0
    """Also checkpoint when this many minutes passed since the last checkpoint (0: off), so a kill in a
    long epoch loses at most this much work. Rank 0's clock decides, at the stop checks."""
    keep_last: NonNegativeInt = 3
    """Keep the newest N periodic (step/epoch) checkpoints, delete older ones (0: keep all)."""
    keep_best: bool = True
    """Keep best.pt: the checkpoint of the best evaluation (EMA accuracy when ema.enabled)."""
    export: bool = True
    """At the end write RUN_DIR/model.safetensors and model.json (timm.create_model arguments)."""
    stop_check_every: PositiveInt = 10
    """How often (optimizer steps) ranks agree on a stop request (SIGUSR1/SIGTERM or a STOP file)."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    surgery: SurgeryConfig = field(default_factory=SurgeryConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict[str, Any]:
        plain = dataclasses.asdict(self)
        plain["optim"]["betas"] = list(plain["optim"]["betas"])  # YAML-friendly
        plain["optim"]["step_epochs"] = list(plain["optim"]["step_epochs"])
        return plain

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
