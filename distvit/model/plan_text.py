"""The surgery plan as text (`distvit surgery --config X`): tokens, parameters, FLOPs, a memory
estimate, the fingerprint and warnings."""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer

from distvit.model.build import native_geometry
from distvit.model.record import SurgeryRecord


def plan_report(model: VisionTransformer, record: SurgeryRecord, global_batch: int) -> str:
    """Human-readable surgery plan with estimates and warnings."""
    params, trainable = record.num_params, record.trainable_params
    # AdamW training: fp32 weights + grads + two moments for trainable parameters, weights only otherwise
    state_bytes = 4 * params + 12 * trainable
    heads = model.blocks[0].attn.num_heads
    tokens = record.tokens_per_image
    # stored activations per image and block, bf16: ~16 token x dim tensors plus two attention maps
    activation_bytes = len(model.blocks) * (16 * tokens * model.embed_dim + 2 * heads * tokens * tokens) * 2
    lines = [
        f"model            {record.model_name} "
        f"({'random init' if record.pretrained == 'none' else record.pretrained + ' weights'}), "
        f"head {record.head} -> {record.num_classes} classes",
        f"input            {record.img_size} px, patch {record.patch_size}: "
        f"grid {record.grid_size[0]}x{record.grid_size[1]}, "
        f"{tokens} tokens per image ({record.num_prefix_tokens} prefix)",
        f"position embed   {record.pos_embed}",
        f"parameters       {params:,} total, {trainable:,} trainable (freeze={record.freeze}"
        f"{', embeddings frozen' if record.freeze_embeddings else ''})",
        f"FLOPs per image  {record.flops_per_image / 1e9:.3f} GFLOP forward, "
        f"~{3 * record.flops_per_image / 1e9:.3f} forward+backward",
        f"memory estimate  {state_bytes / 2**20:.0f} MiB weights+grads+AdamW state; "
        f"~{activation_bytes / 2**20:.1f} MiB activations per image in bf16 "
        f"({global_batch} images: ~{activation_bytes * global_batch / 2**30:.2f} GiB over all ranks)",
        f"fingerprint      {record.fingerprint}",
    ]
    for warning in plan_warnings(record):
        lines.append(f"warning          {warning}")
    return "\n".join(lines)


def plan_warnings(record: SurgeryRecord) -> list[str]:
    warnings = []
    grid = record.grid_size[0]
    if grid <= 3:
        better = max(2, record.img_size // 8)
        warnings.append(
            f"a {grid}x{grid} token grid ({record.img_size} px at patch {record.patch_size}) leaves the transformer "
            f"almost nothing to attend over; use surgery.patch_size={better} (grid 8x8) or a larger img_size "
            f"(e.g. 112 or 128 at patch 16)."
        )
    native_patch = native_geometry(record.model_name)[1]
    if record.pretrained != "none" and record.patch_size < native_patch:
        warnings.append(
            f"shrinking pretrained patches {native_patch} -> {record.patch_size} px resamples the kernel by a "
            f"least-squares fit (large error, unlike growing them); expect to fine-tune all layers "
            f"(surgery.freeze=none)."
        )
    if record.pos_embed == "truncate":
        warnings.append(
            "pos_embed=truncate keeps the first positions of the original grid's top rows (the lesson's slice), "
            "not a smaller layout; interpolate keeps the geometry."
        )
    return warnings
