"""FSDP2 for Qwen-VL policies: sharding, the rollout's full-weight copy, and the collective
discipline a vision-language model needs.

    shard_model(policy, cfg.trainer.fsdp, device)      # fully_shard per vision block, per decoder layer, root
    rollout_model = RolloutCopy(policy, dtype, device)   # full, plain weights for generation
    rollout_model.sync(policy)                           # gathered one unit at a time

World size 1 is the smallest case of the same code (`trainer.fsdp.enable=always`). A LoRA policy
shards like any other (frozen base and fp32 adapters in the same units; only the adapters have
gradients to reduce), and its rollout copy holds the merged weights, W + (alpha / r) * B @ A; the
engine needs that copy on one rank too (it decodes from plain weights).

Two rules keep ranks in step. Every FSDP unit's forward (and backward) is a collective that
every rank must run in the same order, so:
  * every rank runs the same number of micro-batches per pass (`trainers.common.micro_batches`
    all-reduces the count; a rank with nothing left runs an empty micro-batch), and
  * every micro-batch runs the vision tower, even one without images: `forward_with_anchor` adds
    a one-image dummy sequence (loss weight 0, still in the graph). Otherwise one rank would
    all-gather the vision blocks while another went straight to the decoder layers: a hang.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from lensrl.models.load import model_blocks
from lensrl.train import distributed as dist


def fsdp_enabled(cfg) -> bool:
    """`trainer.fsdp.enable`: auto shards when launched on more than one rank."""
    if cfg.enable == "auto":
        return dist.launched_world_size() > 1
    return cfg.enable == "always"


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def shard_model(model: torch.nn.Module, cfg, device: torch.device, train: bool = True) -> None:
    """`fully_shard` each vision block and decoder layer, then the root (embeddings, merger, norm,
    head), in place. On CUDA parameters are all-gathered in bf16 and gradients reduced in fp32
    (the sharded fp32 parameters stay the optimizer's master weights); on CPU everything is fp32.
    Gradients are summed across ranks, not averaged: trainers normalise losses by global counts.
    A mixture-of-experts decoder layer is one unit like any other: its stacked experts (E, 2I, H)
    are sharded along the expert dimension and all-gathered with the layer (no expert
    parallelism: every rank runs all experts on its own tokens)."""
    mixed = device.type == "cuda" and cfg.param_dtype != "float32"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if mixed else None,
                              reduce_dtype=torch.float32 if mixed else None)
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cfg.offload_params else OffloadPolicy()
    kwargs: dict[str, Any] = dict(mp_policy=mp, offload_policy=offload,
                                  reshard_after_forward=cfg.reshard_after_forward)
    vision, layers = model_blocks(model)
    # Blocks take their inputs as they come (cast_forward_inputs=False): FSDP casts forward
    # inputs in its pre-forward hook but skips that hook when activation checkpointing recomputes
    # a block in the backward, so a cast input (the vision tower's fp32 rope cos/sin) would be
    # bf16 in the forward and fp32 in the recompute: different values, and a CheckpointError
    # once the block is compiled (the saved inputs' dtypes differ). Hidden states already arrive
    # in bf16 from the root and the visual unit, which still cast theirs.
    block_mp = MixedPrecisionPolicy(param_dtype=mp.param_dtype, reduce_dtype=mp.reduce_dtype,
                                    cast_forward_inputs=False)
    for block in vision + layers:
        fully_shard(block, **{**kwargs, "mp_policy": block_mp})
    fully_shard(model.model.visual, **kwargs)  # patch embedding + mergers, so a dummy image is cheap
    fully_shard(model, **kwargs)
    if train:
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)


def prepare_micro_batch(model: torch.nn.Module, cfg, last: bool) -> None:
    """Call before each micro-batch's forward; `last`: the mini-batch's last micro-batch, whose
    backward ends the gradient accumulation (every rank has the same count, so all agree).

    With `cfg.reduce_grads == "per_step"` gradients stay unsharded on each rank until the last
    micro-batch, which reduce-scatters their sum once (FSDP2 `set_requires_gradient_sync`, the
    `no_sync` of DDP); with `reshard_after_forward=false` too, the gathered weights also stay until
    then (`set_reshard_after_backward`), so each unit is all-gathered once per optimizer step rather
    than once per micro-batch. The sum is the same; the cost is a full-size fp32 gradient (and bf16
    weight) copy per rank. Nothing to do when the model is not sharded or reduce_grads is per_micro_batch."""
    if not is_sharded(model) or cfg.reduce_grads != "per_step":
        return
    model.set_requires_gradient_sync(last)
    if not cfg.reshard_after_forward:
        model.set_reshard_after_backward(last)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state on CPU, full tensors (a collective; every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_sharded(model):
        return {k: v.detach() for k, v in model.state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the embedding, as save_pretrained writes it
    return state


class RolloutCopy:
    """A plain model (no FSDP, no peft) that the rollout backend generates with, kept equal to the
    policy by `sync`: a sharded policy's weights gathered unit by unit, and a LoRA policy's
    adapters merged into the weights they adapt, W + (alpha / r) * B @ A (lensrl.train.lora).

    Built on the meta device, then each parameter either *aliases* the policy's own tensor or is
    allocated directly in `dtype` on `device` (never a full fp32 model). It aliases when the
    policy holds it whole on this rank (one rank) on `device`, and either in `dtype` or unsharded
    (an unsharded policy computes with that very tensor), and LoRA does not adapt it: bf16 master
    weights on one GPU, and a LoRA policy's frozen base on one rank, cost no second copy. Weights
    LoRA adapts always get their own buffer in `dtype`, which `sync` fills with the merged weight,
    computed in fp32 on the device. Buffers (rotary frequencies) are the policy's.

    Frozen weights are copied once (and again with `sync(policy, frozen=True)`, after a
    checkpoint was loaded): a LoRA policy's sharded base is gathered again only where a unit holds
    adapters to merge.
    """

    def __init__(self, policy: torch.nn.Module, dtype: torch.dtype, device: torch.device):
        from lensrl.train.lora import lora_scales, plain_name

        # a LoRA layer's base weight (policy name) -> its module name, whose merged weight the copy holds
        self.merged = {f"{name}.base_layer.weight": name for name in lora_scales(policy)}
        self.aliased: set[str] = set()
        one_rank, sharded = dist.world_size() == 1, is_sharded(policy)

        def tensor_for(name: str, param: torch.Tensor) -> torch.Tensor:
            local = param.to_local() if isinstance(param, DTensor) else param
            if (name not in self.merged and one_rank and local.shape == param.shape and local.device == device
                    and (local.dtype == dtype or not sharded)):
                self.aliased.add(name)
                return local.detach()
            return torch.empty(param.shape, dtype=dtype, device=device)

        self.model = model = plain_model(policy, dtype, tensor_for, rename=plain_name, what="rollout copy")
        self.params = dict(model.named_parameters())
        self.sync(policy, frozen=True)

    @torch.no_grad()
    def sync(self, policy: torch.nn.Module, frozen: bool = False) -> torch.nn.Module:
        """Copy the policy's current weights in: FSDP unit by unit, each gathered with FSDP's own
        all-gather (one flat collective per unit, in the all-gather dtype: bf16 on GPU), copied
        (LoRA layers: merged), then resharded; a unit with nothing to refresh is not gathered.
        `frozen`: also the weights nothing trains. Every rank must call it (collectives)."""
        from lensrl.train.lora import merged_weight, plain_name

        for unit, names in _units(policy):
            copies = [n for n in names if n not in self.aliased and n not in self.merged and plain_name(n) is not None
                      and (frozen or policy.get_parameter(n).requires_grad)]
            merges = [n for n in names if n in self.merged]
            if not copies and not merges:
                continue
            if unit is not None:
                unit.unshard()
            for name in copies:
                self.params[plain_name(name)].copy_(policy.get_parameter(name))
            for name in merges:  # W + scale * B @ A, computed in fp32 where the weights are, then cast
                self.params[plain_name(name)].copy_(merged_weight(policy.get_submodule(self.merged[name])))
            if unit is not None:
                unit.reshard()
        return self.model


def _units(model: torch.nn.Module) -> list[tuple[FSDPModule | None, list[str]]]:
    """Each FSDP unit of `model` with the names of the parameters it manages (a parameter belongs
    to the innermost unit above it), in module order; parameters of no unit come with None."""
    units = {name: module for name, module in model.named_modules() if isinstance(module, FSDPModule)}
    owned: dict[str, list[str]] = {name: [] for name in units}
    loose: list[str] = []
    for pname, _ in model.named_parameters():
        parts = pname.split(".")
        owner = next((".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1) if ".".join(parts[:i]) in units), None)
        (owned[owner] if owner is not None else loose).append(pname)
    out: list[tuple[FSDPModule | None, list[str]]] = [(units[n], owned[n]) for n in units]
    return out + ([(None, loose)] if loose else [])


def plain_model(model: torch.nn.Module, dtype: torch.dtype, tensor_for, rename=lambda name: name,
                what: str = "copy") -> torch.nn.Module:
    """A frozen, eval-mode model of `model`'s own class (no FSDP) built on the meta device, whose
    parameter `rename(name)` is `tensor_for(name, param)` for each of `model`'s parameters (skipped
    where rename gives None: LoRA adapters), buffers cloned as they are, tied weights tied again.
    The peak is what tensor_for allocates: never a transient copy in the model's own dtype. Raises
    RuntimeError naming a parameter or buffer left without a value."""
    with torch.device("meta"):
        copy = _plain_class(model)._from_config(model.config, dtype=dtype)
    for name, param in model.named_parameters():
        plain = rename(name)
        if plain is not None:
            _set_tensor(copy, plain, torch.nn.Parameter(tensor_for(name, param), requires_grad=False))
    for name, buf in model.named_buffers():
        _set_tensor(copy, rename(name), buf.detach().clone())
    copy.tie_weights()  # tied parameters (Qwen2.5-VL-3B's head) point at the embedding again
    left = [n for n, t in [*copy.named_parameters(), *copy.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{what}: no value for {left[:3]}")
    copy.generation_config = model.generation_config
    return copy.eval().requires_grad_(False)


def _plain_class(model: torch.nn.Module) -> type:
    """The model's own class (fully_shard swaps in a subclass that mixes in FSDPModule)."""
    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def _set_tensor(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if isinstance(value, torch.nn.Parameter):
        owner._parameters[leaf] = value
    else:
        owner._buffers[leaf] = value


def forward_with_anchor(seqs: list, anchor, forward):
    """`forward(seqs)` -> (logp, entropy or None, mask), rows in the order of `seqs`. With an
    `anchor` (FSDP runs) and no image among `seqs` (an empty list included), the anchor rides along
    and its row is dropped, but kept in the graph with weight 0: the vision tower's all-gathers, and
    in backward its reduce-scatters, run as on the ranks whose micro-batch has images."""
    if anchor is None or any(s.pixel_values is not None for s in seqs):
        return forward(seqs)
    logp, entropy, mask = forward([*seqs, anchor])
    zero = logp[-1].sum() * 0.0
    return logp[:-1] + zero, entropy[:-1] if entropy is not None else None, mask[:-1]
