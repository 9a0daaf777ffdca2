"""The paged KV cache: one pool of fixed-size blocks for every layer, and the free list over it.

Layout: `data` is (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim); a sequence's
cache is the list of blocks in its block table, token t at block_table[t // block_size], offset
t % block_size. A GRPO group's prompt fills its blocks once and its n samples all point at them
(prefix sharing); each sample owns the blocks it writes, starting with a copy of the prompt's
last, partly filled block. Block 0 is never handed out: padded rows of a decode batch write there.

The pool is allocated for a generate call (`wake`) and dropped after it (`sleep`), so the trainer
gets the memory back while it runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


class BlockAllocator:
    """Free list of block ids 1..num_blocks-1 (block 0 is the scratch block)."""

    def __init__(self, num_blocks: int):
        assert num_blocks >= 2, "need the scratch block and at least one real block"
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        assert count <= len(self._free), f"asked for {count} blocks, {len(self._free)} free"
        return [self._free.pop() for _ in range(count)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


class KVCache:
    """The block pool of all layers (see module doc)."""

    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device):
        self.layout = layout
        self.num_blocks = num_blocks
        shape = (layout.num_layers, 2, num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
        # Zeroed: the torch attention path reads whole blocks (masked), and 0 * NaN would leak.
        self.data = torch.zeros(shape, dtype=layout.dtype, device=device)

    def keys(self, layer: int) -> torch.Tensor:
        return self.data[layer, 0]  # (num_blocks, block_size, kv_heads, head_dim)

    def values(self, layer: int) -> torch.Tensor:
        return self.data[layer, 1]

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy whole blocks src[i] -> dst[i] in every layer (a sample's copy of the prompt's tail)."""
        if not src:
            return
        device = self.data.device
        src_t = torch.tensor(src, dtype=torch.long, device=device)
        dst_t = torch.tensor(dst, dtype=torch.long, device=device)
        self.data.index_copy_(2, dst_t, self.data.index_select(2, src_t))


def kv_budget_bytes(device: torch.device, fraction: float) -> int:
    """`fraction` of the memory that is free now: on CUDA what the driver reports free plus what
    PyTorch's allocator holds unused (the trainer's cached blocks); on CPU MemAvailable."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"rollout.gpu_memory_utilization must be in (0, 1], got {fraction}")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(fraction * (free + cached))
    return int(fraction * _host_available_bytes())


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
