"""distvit: fine-tune pretrained Vision Transformers across GPUs and nodes."""

__version__ = "0.1.0"
