"""Datasets as webdataset tar shards: writing (`writer`), the manifest, epoch planning and reading."""
