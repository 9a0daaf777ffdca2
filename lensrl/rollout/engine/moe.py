"""Mixture-of-experts maths of the decode path: the router, the experts as grouped matrix
products, and how often the engine's routing differs from the trainer's.

It follows transformers' Qwen3-VL-MoE sparse block (`Qwen3VLMoeTextSparseMoeBlock`) op for op,
dtypes included, with the experts forward it runs by default (`experts_implementation` =
"grouped_mm"):

    router     logits = h @ W_r^T                       (B, E) in h's dtype
               p = softmax(logits) in fp32, top-k of p   (B, K) experts and their probabilities
               weights = p_top / sum(p_top), cast to the logits' dtype   (Qwen3-VL-MoE always
               renormalises; its config has no norm_topk_prob switch)
    experts    per (token, slot): x = h.to(experts' dtype)
               y = down_e @ (act(gate_e @ x) * (up_e @ x)),  gate_up_e = [gate_e; up_e]  (2I, H)
               out = sum over the K slots of y * weight, cast back to h's dtype

Expert weights are the model's stacked parameters, read in place: gate_up (E, 2I, H), down
(E, H, I). Two implementations of the experts, same maths:

  * `grouped_experts`: the B * K (token, slot) pairs grouped by expert, one `torch._grouped_mm`
    per projection over all E experts with cumulative row offsets. Grouping and offsets are
    computed on the device from a (B * K, E) comparison and cumsums (`group_by_expert`): no
    host sync, no sort and no data-dependent shape, so a CUDA graph can capture it (an expert
    nobody chose is an empty group; the comparison is B * K * E booleans, 0.5 MB for 512 rows
    of top-8 of 128). Needs 16-byte aligned strides. The engine uses it where torch has a
    native kernel (`grouped_mm_native`: CUDA, bf16, SM90/SM100) and it agrees with
    `gathered_experts` on the policy's weights.
  * `gathered_experts`: each slot's expert matrices gathered with `index_select` and applied
    with `bmm`, in chunks of at most `GATHER_BYTES` of gathered weights. No Python loop over
    experts; reads K expert matrices per token, which is fine for decode's small batches and
    the CPU, and the fallback wherever grouped_mm does not run.

`trainer_routing` and `router_mismatch` measure routing consistency (`rollout/router_mismatch`):
the fraction of (token, MoE layer) routing decisions where the engine's top-k expert set
differs from the one the training forward picks for the same token of the same sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

# Upper bound on the expert weights `gathered_experts` materialises at once (per projection).
GATHER_BYTES = 256 * 2**20


def route(hidden: torch.Tensor, router_weight: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k router: hidden (B, H), router_weight (E, H) -> (weights (B, K) in the logits'
    dtype, experts (B, K) long). Probabilities are a softmax in fp32 of the logits, the top-k
    renormalised to sum to one (see module doc)."""
    logits = F.linear(hidden, router_weight)  # (B, E)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    top, experts = torch.topk(probs, top_k, dim=-1)  # (B, K) each
    top = top / top.sum(dim=-1, keepdim=True)
    return top.to(logits.dtype), experts


ActMul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def group_by_expert(
    experts: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order the (token, slot) pairs by expert, stably, with elementwise ops and cumsums only (no
    sort, no host sync: capturable in a CUDA graph).

    experts (B, K) long -> (order (S,) long: the slot at each grouped position, S = B * K and
    slot s belongs to token s // K; where (S,) long: the grouped position of each slot, the
    inverse of order; offsets (E,) int32: where each expert's group ends, for grouped_mm).
    """
    flat = experts.reshape(-1)  # (S,)
    hit = flat[:, None] == torch.arange(num_experts, device=flat.device)  # (S, E) bool
    counts = hit.sum(0)  # (E,) slots per expert
    ends = counts.cumsum(0)  # (E,)
    rank = (hit.cumsum(0) * hit).sum(1) - 1  # (S,) earlier slots of the same expert
    where = (ends - counts)[flat] + rank  # (S,) a permutation of 0..S-1
    order = torch.empty_like(where).index_copy_(0, where, torch.arange(flat.shape[0], device=flat.device))
    return order, where, ends.to(torch.int32)


def grouped_experts(
    hidden: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    act_mul: ActMul = _silu_mul,
) -> torch.Tensor:
    """Experts as two grouped GEMMs (see module doc).

    hidden (B, H); weights (B, K); experts (B, K) long; gate_up (E, 2I, H); down (E, H, I).
    Returns (B, H) in hidden's dtype. Capturable in a CUDA graph: every shape depends on B, K,
    E only, and the per-expert offsets stay on the device.
    """
    batch, top_k = experts.shape
    num_experts, inner = gate_up.shape[0], gate_up.shape[1] // 2
    order, where, offsets = group_by_expert(experts, num_experts)  # (S,), (S,), (E,)
    x = hidden.index_select(0, order // top_k).to(gate_up.dtype)  # (S, H) grouped by expert
    gate_up_out = torch._grouped_mm(x, gate_up.transpose(1, 2), offs=offsets)  # (S, 2I)
    inner_out = act_mul(gate_up_out[:, :inner], gate_up_out[:, inner:])  # (S, I)
    out = torch._grouped_mm(inner_out, down.transpose(1, 2), offs=offsets)  # (S, H)
    out = out.index_select(0, where)  # (S, H) back in (token, slot) order
    out = out * weights.reshape(-1, 1)
    return out.view(batch, top_k, -1).sum(dim=1).to(hidden.dtype)


def gathered_experts(
    hidden: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    act_mul: ActMul = _silu_mul,
) -> torch.Tensor:
    """Experts by gathering each slot's expert matrices and one `bmm` per projection.

    Same arguments and result as `grouped_experts`. The (token, slot) pairs run in chunks so
    that at most GATHER_BYTES of expert weights are gathered at once per projection.
    """
    batch, top_k = experts.shape
    inner = gate_up.shape[1] // 2
    flat = experts.reshape(-1)  # (S,)
    x = hidden.to(gate_up.dtype).repeat_interleave(top_k, dim=0)  # (S, H), slot s = token s // K
    per_slot = gate_up[0].numel() * gate_up.element_size()
    chunk = max(1, GATHER_BYTES // per_slot)
    outs = []
    for start in range(0, flat.shape[0], chunk):  # static bounds: B * K and the weight shapes
        ids = flat[start : start + chunk]  # (C,)
        gate_up_out = torch.bmm(gate_up.index_select(0, ids), x[start : start + chunk, :, None])  # (C, 2I, 1)
        gate_up_out = gate_up_out.squeeze(-1)
        inner_out = act_mul(gate_up_out[:, :inner], gate_up_out[:, inner:])  # (C, I)
        outs.append(torch.bmm(down.index_select(0, ids), inner_out[:, :, None]).squeeze(-1))  # (C, H)
    out = torch.cat(outs) if len(outs) > 1 else outs[0]  # (S, H)
    out = out * weights.reshape(-1, 1)
    return out.view(batch, top_k, -1).sum(dim=1).to(hidden.dtype)


def grouped_mm_native(gate_up: torch.Tensor) -> bool:
    """Whether torch runs `_grouped_mm` on these expert weights with its native CUDA kernel
    (CUTLASS, bf16, SM90/SM100). Elsewhere on CUDA it falls back to a loop over the groups that
    reads the offsets on the host: correct, but a sync per call that breaks graph capture."""
    if gate_up.device.type != "cuda" or gate_up.dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    return torch.cuda.get_device_capability(gate_up.device)[0] in (9, 10)


def check_grouped(gate_up: torch.Tensor, down: torch.Tensor, top_k: int, seed: int = 0) -> None:
    """Run `grouped_experts` against `gathered_experts` on random tokens with these expert
    weights; raise on any failure or mismatch (grouped_mm unsupported for this device, dtype or
    alignment)."""
    device = gate_up.device
    gen = torch.Generator(device=device).manual_seed(seed)
    batch, num_experts, hidden_size = 7, gate_up.shape[0], gate_up.shape[2]
    hidden = torch.randn(batch, hidden_size, generator=gen, device=device).to(gate_up.dtype)
    scores = torch.rand(batch, num_experts, generator=gen, device=device)
    weights, experts = torch.topk(scores, min(top_k, num_experts), dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(gate_up.dtype)
    got = grouped_experts(hidden, weights, experts, gate_up, down)
    want = gathered_experts(hidden, weights, experts, gate_up, down)
    scale = want.abs().max().clamp_min(1e-6)
    tol = 1e-4 if gate_up.dtype == torch.float32 else 3e-2
    if not bool(torch.isfinite(got).all()) or float((got - want).abs().max() / scale) > tol:
        raise AssertionError("grouped_mm experts disagree with the gathered reference")


# ---------------------------------------------------------------------------------------------
# Routing consistency: engine vs trainer
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def trainer_routing(model: torch.nn.Module, seqs: Sequence, top_k: int | None = None) -> list[torch.Tensor]:
    """The experts the training forward routes the engine's decode tokens to.

    seqs: `lensrl.train.sequences.Sequence`s (prompt + response). One packed forward (the
    trainer's layout, `lensrl.train.packing`) with output_router_logits; the top-k of each MoE
    layer's router, as `route` takes it. Returns per sequence (R - 1, L, K) long on the CPU:
    row j is response token j at position prompt_length + j, the input of the engine's j-th
    decode step (the last response token is never fed back, so it has no decode routing); L
    counts the MoE layers in order, K the experts per token.
    """
    from lensrl.train.attention import enable_packed_attention
    from lensrl.train.packing import pack_sequences
    from lensrl.train.router import moe_routers

    text = model.config.get_text_config()
    top_k = top_k or text.num_experts_per_tok
    enable_packed_attention(model)
    device = next(model.parameters()).device
    # Eager, also where the blocks are compiled (`model.compile`): transformers collects router
    # logits through a ContextVar that a compiled block's cached graph does not see, so a block
    # traced before without the collector (the engine's prefill, the old-logprob pass) records
    # nothing: 4 of 12 layers on the GPU, none in the CPU test.
    with torch.compiler.set_stance("force_eager"):
        output = model.model(**pack_sequences(list(seqs), device), use_cache=False, output_router_logits=True)
    if len(output.router_logits) != (layers := len(moe_routers(model))):
        raise RuntimeError(f"router logits of {len(output.router_logits)} layers from a model with {layers} MoE layers")
    logits = torch.stack(
        [layer.reshape(-1, layer.shape[-1]) for layer in output.router_logits], 1
    )  # (T, L, E)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    experts = torch.topk(probs, top_k, dim=-1).indices.cpu()  # (T, L, K)
    out, start = [], 0
    for seq in seqs:
        first = start + seq.prompt_length
        out.append(experts[first : start + seq.num_tokens - 1])
        start += seq.num_tokens
    return out


def router_mismatch(engine: Sequence, trainer: Sequence) -> float:
    """Fraction of (token, layer) routing decisions whose top-k expert set differs.

    engine, trainer: per sequence (N_i, L, K) expert ids (tensors or arrays) for the same
    tokens (`EngineRollout.routed_experts`, `trainer_routing`). The order within the top-k is
    ignored. 0.0 when there is nothing to compare.
    """
    assert len(engine) == len(trainer), (len(engine), len(trainer))
    differ = total = 0
    for got, want in zip(engine, trainer):
        got, want = torch.as_tensor(got).long(), torch.as_tensor(want).long()
        assert got.shape == want.shape, (got.shape, want.shape)
        same = got.sort(dim=-1).values == want.sort(dim=-1).values  # (N, L, K)
        differ += int((~same.all(dim=-1)).sum())
        total += same.shape[0] * same.shape[1]
    return differ / total if total else 0.0
