#!/usr/bin/env bash
# GPU check of the data layer on one GPU (nothing downloaded):
#   bash launch/gpu_data_check.sh OUT_DIR
# 1. `distvit bench data` at 32 px and 224 px (distvit readers vs the lesson's pipeline, same process);
# 2. a bf16 training run in stream mode (loader workers, pinned uint8 batches);
# 3. the same run stopped at step 50 and resumed (CUDA RNG state restored): final weights compared.
# Writes bench JSON, the log and a summary to OUT_DIR.
set -euo pipefail
out=${1:?usage: bash launch/gpu_data_check.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
work=$(mktemp -d)
log="$out/data_check.log"
python3 -m distvit.cli prepare synthetic --out "$work/data" --train-size 5000 --test-size 1000 | tee -a "$log"
python3 -m distvit.cli bench data --data "$work/data" --json "$out/bench32.json" | tee -a "$log"
python3 -m distvit.cli bench data --data "$work/data" --img-size 224 --batch-size 128 --steps 20 --json "$out/bench224.json" | tee -a "$log"

train() {  # run dir, overrides...
  local dir=$1; shift
  accelerate launch --num_machines 1 --num_processes 1 --dynamo_backend no distvit/train.py --config configs/demo.yaml \
    data.path="$work/data" run.dir="$work/$dir" tracking.backend=none train.mixed_precision=bf16 data.mode=stream \
    data.num_workers=4 train.epochs=2 "$@" 2>&1 | tr '\r' '\n' | grep -v 'it/s' | tee -a "$log"
}
train full
train cut train.stop_at_step=50
train cut train.resume=auto
python3 - "$work" "$out" <<'PY' | tee -a "$log"
import json, sys, torch
work, out = sys.argv[1], sys.argv[2]
full = torch.load(f"{work}/full/checkpoints/final.pt", weights_only=True)
cut = torch.load(f"{work}/cut/checkpoints/final.pt", weights_only=True)
diff = max((full["model"][k].float() - cut["model"][k].float()).abs().max().item() for k in full["model"])
summary = {name: json.load(open(f"{work}/{name}/summary.json")) for name in ("full", "cut")}
result = {
    "device": torch.cuda.get_device_name(), "torch": torch.__version__,
    "stream_bf16_accuracy": summary["full"]["final"]["accuracy"], "eval_samples": summary["full"]["final"]["num_samples"],
    "stream_train_images_per_sec": summary["full"]["train_images_per_sec"],
    "resumed_steps": summary["cut"]["steps"], "max_abs_weight_diff_resumed_vs_full": diff,
}
json.dump(result, open(f"{out}/data_check.json", "w"), indent=1)
print(json.dumps(result, indent=1))
PY
