"""Datasets as webdataset tar shards.

At this level, the dataset contract that writers and readers share: the manifest (`manifest`), the shard
format (`shard_format`), the tar index (`tarindex`), decoding stored images (`images`), the exactly-once
epoch plan (`plan`), and the facts of this node read once (`node`, `devices`). Below it, two roles that never
import each other: `prepare/` makes datasets (the writer and the importers), `read/` reads them for training
(loaders, memory and stream modes, the shard cache, remote fetches, start-up checks).
"""
