"""Read a checkpoint's weights shard by shard, and write converted weights as safetensors shards.

Neither side holds the whole model: the reader yields one tensor at a time (a `.bin` shard is memory-mapped,
`torch.load(weights_only=True, mmap=True)`; a safetensors shard is read tensor by tensor), and the writer
flushes a shard to disk as soon as it reaches `max_shard_bytes`. Peak memory is about one source tensor plus
one output shard. Pickled files are only ever read with `weights_only=True`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from loraforge.errors import ModelError, Problem

if TYPE_CHECKING:
    import torch

INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files in index order; safetensors preferred over pickled `.bin`.

    Raises:
        ModelError: no weights in the folder, or the index names a missing shard.
    """
    model_dir = Path(model_dir)
    for name in INDEX_NAMES:
        index = model_dir / name
        if index.is_file():
            files = list(dict.fromkeys(json.loads(index.read_text())["weight_map"].values()))
            missing = [f for f in files if not (model_dir / f).is_file()]
            if missing:
                raise ModelError([Problem("base_model", f"{index.name} names shards that are missing",
                                          value=missing, fix="copy every shard of the checkpoint")])
            return [model_dir / f for f in files]
    for name in SINGLE_NAMES:
        if (model_dir / name).is_file():
            return [model_dir / name]
    raise ModelError([Problem("base_model", "no weights found (model.safetensors, pytorch_model.bin or a sharded "
                              "index)", value=str(model_dir))])


def iter_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every weight, one shard at a time."""
    import torch

    for file in weight_files(model_dir):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
                state = torch.load(file, map_location="cpu", weights_only=True)
            for name in list(state):
                yield name, state.pop(name)
            del state


class ShardWriter:
    """Collects tensors and writes `model-0000k-of-0000n.safetensors` shards plus the index."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = 2 * 1024**3):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.pending or any(name in s for s in self.shards):
            raise ValueError(f"tensor {name} written twice")
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        k = len(self.shards) + 1
        save_file(self.pending, str(self.out_dir / f"model-part-{k:05d}.safetensors"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard and the index; returns the shard file names."""
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            (self.out_dir / "model-part-00001.safetensors").rename(self.out_dir / "model.safetensors")
            return ["model.safetensors"]
        names, weight_map = [], {}
        for k, tensors in enumerate(self.shards, 1):
            name = f"model-{k:05d}-of-{n:05d}.safetensors"
            (self.out_dir / f"model-part-{k:05d}.safetensors").rename(self.out_dir / name)
            names.append(name)
            weight_map.update({t: name for t in tensors})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        return names
