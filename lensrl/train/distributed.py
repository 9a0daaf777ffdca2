"""Process-group helpers. One process is world size 1, not a special case: every helper works
without `torch.distributed` initialised."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def launched_world_size() -> int:
    """The number of ranks the launcher (torchrun) started; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device, timeout_s: float = 600, force: bool = False) -> None:
    """Join the process group when launched by torchrun with several ranks, or make one when
    `force` (FSDP in a single process: torchrun's env, else a private one-rank group)."""
    if dist.is_initialized() or (launched_world_size() <= 1 and not force):
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank())
    timeout = timedelta(seconds=timeout_s)
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend=backend, timeout=timeout)
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=timeout)


def set_cpu_threads(threads: int = 0) -> int:
    """Set torch's CPU threads for this rank and return the count. `threads` > 0 is used as given.
    0 (auto): when torchrun started several ranks on this machine with OMP_NUM_THREADS=1, which it
    sets itself when the user has not, the machine's cores (those this process may run on) are
    shared evenly among them (LOCAL_WORLD_SIZE), at least 1 each; otherwise torch's choice is kept.
    torchrun's 1 made every CPU part of a step (image preprocessing, packing, reward bookkeeping)
    single-threaded at 2 ranks but not at 1. To keep 1 thread per rank, pass 1."""
    if threads <= 0:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if local <= 1 or os.environ.get("OMP_NUM_THREADS", "1") != "1":
            return torch.get_num_threads()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // local)
    torch.set_num_threads(threads)
    return threads


def shutdown() -> None:
    """Leave the process group (when one was joined), so no communicator thread is torn down by
    interpreter exit: without it a rank can abort at exit ("terminate called without an active
    exception") after a run that succeeded."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_reduce(value: torch.Tensor, op) -> torch.Tensor:
    """`value` reduced over ranks, on its own device (the collective runs where the backend needs)."""
    if dist.is_initialized():
        moved = value.to(_comm_device())
        dist.all_reduce(moved, op=op)
        return moved.to(value.device)
    return value


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    return _all_reduce(value, dist.ReduceOp.SUM)


def all_reduce_max(value: torch.Tensor) -> torch.Tensor:
    return _all_reduce(value, dist.ReduceOp.MAX)


def host_floats(metrics: dict) -> dict[str, float]:
    """`metrics` with every tensor value (0-d, one device) made a float by one device->host copy for
    all of them (one host sync, not one per value)."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in metrics.items() if k not in keys}
    if keys:
        out.update(zip(keys, torch.stack([metrics[k].detach().float().reshape(()) for k in keys]).tolist()))
    return out


def sum_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Each key summed over ranks (every rank must pass the same keys)."""
    if not dist.is_initialized() or not metrics:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return dict(zip(keys, values.tolist()))


def mean_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Each key averaged over ranks ("max" keys: the maximum). Tensors become floats."""
    metrics = {k: float(v) for k, v in metrics.items()}
    if not dist.is_initialized() or not metrics:
        return metrics
    keys = sorted(metrics)
    world = dist.get_world_size()
    values = [metrics[k] for k in keys]
    gathered = all_gather_objects(values)
    out = {}
    for j, k in enumerate(keys):
        column = [g[j] for g in gathered]
        out[k] = max(column) if "max" in k else sum(column) / world
    return out


def weighted_mean_metrics(metrics: dict[str, float], weight: float) -> dict[str, float]:
    """Each key's mean over ranks weighted by each rank's `weight` (e.g. its token count): a
    per-token mean over the whole batch from per-rank per-token means. One all-reduce."""
    metrics = {k: float(v) for k, v in metrics.items()}
    if not dist.is_initialized() or not metrics:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] * weight for k in keys] + [weight], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    total = values[-1].item()
    return {k: (v / total if total > 0 else 0.0) for k, v in zip(keys, values[:-1].tolist())}


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list in a single process)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(items: list[Any], block_size: int | None = None) -> list[Any]:
    """This rank's share of `items` (len must divide evenly over the ranks): see `share`."""
    n = world_size()
    if len(items) % n:
        raise ValueError(f"{len(items)} items cannot be split evenly over {n} ranks")
    return [items[i] for i in share(len(items), n, rank(), block_size)]


def share(num_items: int, num_ranks: int, rank_: int, block_size: int | None = None) -> list[int]:
    """Indices of rank `rank_`'s share of `num_items`: contiguous, or with `block_size` (dividing
    num_items, divisible by num_ranks) an equal contiguous slice of every block, so each rank holds
    the same share of each GRPO mini-batch and balancing tokens per mini-batch has little to move."""
    if not block_size or block_size % num_ranks or num_items % block_size:
        block_size = num_items
    per = block_size // num_ranks
    return [i for start in range(0, num_items, block_size) for i in range(start + rank_ * per, start + (rank_ + 1) * per)]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA device is available (use trainer.device=auto or cpu)")
    return torch.device(f"cuda:{local_rank()}" if name == "cuda" else name)


def balanced_assignment(lengths: list[int], num_ranks: int, owners: list[int] | None = None) -> list[int]:
    """Which rank gets each item so that ranks carry similar token counts, moving few items.

    lengths: tokens per item; owners: where each item is now (None: nowhere yet, all start on
    rank 0). Repeatedly moves, from the most to the least loaded rank, the item that best closes
    their gap (length below the gap: each move strictly narrows it), until no item does.
    Deterministic (ties: lower index, lower rank), so every rank computes the same plan."""
    owner = list(owners) if owners is not None else [0] * len(lengths)
    load = [0] * num_ranks
    for length, rank_ in zip(lengths, owner):
        load[rank_] += length
    on_rank: list[list[int]] = [[] for _ in range(num_ranks)]
    for i, rank_ in enumerate(owner):
        on_rank[rank_].append(i)
    while True:
        heavy = max(range(num_ranks), key=lambda r: (load[r], -r))
        light = min(range(num_ranks), key=lambda r: (load[r], r))
        gap = load[heavy] - load[light]
        movable = [i for i in on_rank[heavy] if 0 < lengths[i] < gap]
        if not movable:
            return owner
        i = min(movable, key=lambda i: (abs(gap - 2 * lengths[i]), i))
        on_rank[heavy].remove(i)
        on_rank[light].append(i)
        owner[i] = light
        load[heavy] -= lengths[i]
        load[light] += lengths[i]


def exchange(items: dict[int, Any], owner: dict[int, int]) -> dict[int, Any]:
    """Move items between ranks. `items`: this rank's {global id: item}; `owner`: every global id's
    destination rank (the same dict on every rank). Returns the items this rank now owns; only
    the items that change rank travel (pickled, one scatter per source rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(items)
    me, world = dist.get_rank(), dist.get_world_size()
    outgoing: list[dict[int, Any]] = [{} for _ in range(world)]
    for gid, item in items.items():
        outgoing[owner[gid]][gid] = item
    mine = dict(outgoing[me])
    outgoing[me] = {}
    for src in range(world):
        received: list[Any] = [None]
        dist.scatter_object_list(received, outgoing if src == me else None, src=src)
        mine.update(received[0])
    return mine
