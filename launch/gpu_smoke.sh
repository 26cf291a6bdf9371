#!/usr/bin/env bash
# GPU smoke check of the training path on one GPU (nothing downloaded):
#   bash launch/gpu_smoke.sh OUT_DIR
# Prepares the synthetic demo data, then runs configs/demo.yaml on 1 GPU in fp32, bf16 and fp16 (loss
# scaling), once upscaled to 224 px in bf16, once in fp16 with the training features (fused AdamW, EMA,
# clipping, Mixup/CutMix, label smoothing) and once compiled in bf16; writes the log, each run's summary
# and a markdown table (gpu_smoke.md) to OUT_DIR. About 6 minutes on an H100.
set -euo pipefail
out=${1:?usage: bash launch/gpu_smoke.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
work=$(mktemp -d)
python3 -m distvit.cli prepare synthetic --out "$work/data" --train-size 5000 --test-size 1000

run() {  # name, overrides...
  local name=$1; shift
  local start=$SECONDS
  accelerate launch --num_machines 1 --num_processes 1 --dynamo_backend no distvit/train.py \
    --config configs/demo.yaml data.path="$work/data" run.dir="$work/$name" tracking.backend=none "$@" \
    2>&1 | tr '\r' '\n' | grep -v 'it/s' | tee -a "$out/smoke.log"
  cp "$work/$name/summary.json" "$out/$name.summary.json"
  echo "$name $((SECONDS - start))" >> "$work/wall.txt"
}

run fp32 train.mixed_precision=no
run bf16 train.mixed_precision=bf16
run fp16 train.mixed_precision=fp16
run bf16-224 train.mixed_precision=bf16 surgery.img_size=224 train.epochs=2
run fp16-features train.mixed_precision=fp16 ema.enabled=true optim.clip_grad_norm=1.0 mix.mixup_alpha=0.8 \
  mix.cutmix_alpha=1.0 train.label_smoothing=0.1
run bf16-compile train.mixed_precision=bf16 train.compile=true

python3 - "$out" "$work/wall.txt" <<'PY'
import json, sys, pathlib, torch
out, wall = pathlib.Path(sys.argv[1]), dict(line.split() for line in open(sys.argv[2]))
rows = ["| run | device | precision (logits dtype) | img px | epochs | test accuracy | EMA accuracy | eval samples | train img/s | compile s | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
for name in wall:
    s = json.loads((out / f"{name}.summary.json").read_text())
    rows.append(f"| {name} | {torch.cuda.get_device_name()} | {s['mixed_precision']} ({s['compute_dtype']}) | "
                f"{s['surgery']['img_size']} | {s['epochs']} | {s['final']['accuracy']:.4f} | "
                f"{s['final'].get('ema_accuracy', float('nan')):.4f} | {s['final']['num_samples']} | "
                f"{s['train_images_per_sec']:.0f} | {s.get('compile_seconds') or 0:.1f} | {wall[name]} |")
table = "\n".join(rows)
(out / "gpu_smoke.md").write_text(table + f"\n\ntorch {torch.__version__}\n")
print(table)
PY
