"""Run under accelerate launch with 2 ranks: rank 1 perturbs one weight after surgery; the fingerprint
check (the one distvit's trainer runs before DDP) must stop both ranks with a clear error."""

import sys

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from distvit.config import load_config
from distvit.engine.peers import check_same_model_everywhere
from distvit.errors import DistvitError
from distvit.model.build import build_model
from distvit.model.record import fingerprint


def build(cfg, num_classes):
    """build_model from a whole Config (its model and surgery sections)."""
    return build_model(cfg.model, cfg.surgery, num_classes)


accelerator = Accelerator(cpu=True)
set_seed(0)
model, record = build(load_config(None, [f"data.path={sys.argv[1]}", "surgery.img_size=32"]), 10)
if accelerator.process_index == 1:
    with torch.no_grad():
        model.blocks[5].mlp.fc1.weight[3, 7] += 1e-6
    record.fingerprint = fingerprint(model, record.plan())
try:
    check_same_model_everywhere(record)
except DistvitError as err:
    print(f"rank {accelerator.process_index}: {err}", flush=True)
    sys.exit(3)
print(f"rank {accelerator.process_index}: fingerprints agree", flush=True)
