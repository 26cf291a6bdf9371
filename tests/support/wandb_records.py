"""Read an offline W&B run file (`run-<id>.wandb`) without W&B's Go core: the file is a log of 32 KiB
blocks holding length-prefixed, possibly fragmented protobuf `Record`s (LevelDB log format)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

_BLOCK = 32 * 1024
_HEADER = 7  # file header ':W&B' + magic + version; each record header: crc32, length, type
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[Any]:
    raw = path.read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, pos = [], b"", _HEADER
    while pos + _HEADER <= len(raw):
        room = _BLOCK - pos % _BLOCK
        if room < _HEADER:  # block trailer padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + _HEADER])
        pos += _HEADER
        if kind == 0:  # zero padding to the block end
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0
            continue
        chunk = raw[pos : pos + length]
        pos += length
        if kind == _FULL:
            records.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            records.append(pending + chunk)
    parsed = []
    for data in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        parsed.append(record)
    return parsed


def summarize(run_dir: Path) -> dict[str, Any]:
    """{'run_id', 'config' (top-level keys), 'history' (list of {key: json value})} of one offline run dir."""
    files = list(run_dir.glob("run-*.wandb"))
    assert len(files) == 1, files
    out: dict[str, Any] = {"run_id": None, "config": set(), "history": []}
    for record in read_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run_id"] = record.run.run_id
        elif kind == "config":
            out["config"] |= {item.key for item in record.config.update}
        elif kind == "history":
            out["history"].append(
                {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            )
    return out
