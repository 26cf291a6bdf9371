"""Reading datasets for training and evaluation: the loaders, memory and stream modes, the batch ring,
the split shared once per node, the remote shard cache and fetches, and the start-up checks.

Nothing here imports from distvit.data.prepare (tests/unit/test_architecture.py)."""
