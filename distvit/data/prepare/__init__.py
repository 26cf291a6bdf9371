"""Making datasets: the shard writer and the importers (synthetic, digits, CIFAR-10, image folders).

Used by the `distvit prepare` command only; nothing here reads shards for training, and nothing in
distvit.data.read imports from here (tests/unit/test_architecture.py)."""
