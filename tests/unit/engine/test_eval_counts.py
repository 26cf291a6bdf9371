"""distvit.engine.eval_counts: exact counts, top-5 and confusion matrix."""

from __future__ import annotations

import torch


def test_evaluation_counts_top5_and_confusion():
    from accelerate import Accelerator

    from distvit.augment.transforms import BatchTransform
    from distvit.data.read.loader import MemoryBatches
    from distvit.data.read.memory import SplitTensors
    from distvit.engine.eval_counts import evaluate_models

    class Fixed(torch.nn.Module):
        """Predicts class (mean pixel value * 10), then class 0, then the others in index order."""

        def forward(self, x):
            target = (x.mean(dim=(1, 2, 3)) * 10).round().long().clamp(0, 9)
            logits = -0.01 * torch.arange(10.0).expand(x.shape[0], 10).clone()
            logits[torch.arange(x.shape[0]), target] = 2.0
            logits[:, 0] += 1.0
            return logits

    values = torch.tensor([0.1, 0.2, 0.2, 0.5, 0.9, 0.3, 0.0, 0.1])
    images = (values.view(-1, 1, 1, 1) * 255).round().to(torch.uint8).expand(-1, 4, 4, 3).contiguous()
    labels = torch.tensor([1, 2, 3, 5, 9, 4, 0, 8])
    data = MemoryBatches(SplitTensors(images=images, labels=labels))
    transform = BatchTransform((4, 4), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    result = evaluate_models({"m": Fixed()}, data, transform, 3, Accelerator(cpu=True), 10)["m"]
    assert (result.correct, result.num_samples) == (5, 8)  # 3 -> 2, 4 -> 3 and 8 -> 1 are wrong
    assert result.confusion[3][2] == 1 and result.confusion[4][3] == 1 and result.confusion[8][1] == 1
    assert sum(map(sum, result.confusion)) == 8
    assert result.top5_correct == 7  # 3 and 4 are in their top 5 ({2, 0, 1, 3, 4}, {3, 0, 1, 2, 4}), 8 is not
    assert result.per_class_accuracy()[3] == 0.0 and result.per_class_accuracy()[9] == 1.0
    assert result.per_class_accuracy()[6] is None


def test_sample_images_kept_for_the_tracker_are_those_of_their_samples_with_ring_backed_batches(small_dataset):
    """On a CPU with loader workers a batch's images are a slot of the shared ring, refilled by later
    batches: the pictures kept for W&B must still be those of their labels once the evaluation is over."""
    from accelerate import Accelerator

    from distvit.augment.transforms import BatchTransform
    from distvit.data.manifest import read_manifest
    from distvit.data.read.loader import StreamBatches
    from distvit.data.read.memory import load_split
    from distvit.engine.eval_counts import NUM_SAMPLE_IMAGES, evaluate_models

    class Mean(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3)).repeat(1, 4)[:, :10]

    manifest = read_manifest(small_dataset)
    expected = load_split(small_dataset, manifest, "test")
    stream = StreamBatches(small_dataset, manifest, "test", 2, torch.device("cpu"))
    transform = BatchTransform((32, 32), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    # 101 samples in batches of 8: 13 batches through a ring of 10 slots, so the first slot is reused
    result = evaluate_models({"m": Mean()}, stream, transform, 8, Accelerator(cpu=True), 10)["m"]
    assert stream.ring is not None and stream.ring.slots < 13
    assert len(result.samples) == min(NUM_SAMPLE_IMAGES, 8)  # rank 0's first batch
    for i, sample in enumerate(result.samples):
        assert torch.equal(sample["image"], expected.images[i]), i
        assert sample["label"] == int(expected.labels[i])
