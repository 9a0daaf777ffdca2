"""The routers of a mixture-of-experts policy in training: the load-balancing loss and how evenly
tokens spread over the experts, from the router logits of the training forward itself.

    router = RouterRecorder(policy, coef=cfg.model.router_aux_loss_coef)  # inert for a dense model
    with router.capture() as routed:          # around one micro-batch's training forward
        logp, entropy, mask = forward_response_logprobs(policy, seqs, ...)
    term, metrics = router.loss_term(routed, share, "actor")  # share: the micro-batch's part of the mini-batch
    loss = loss + term                        # + coef * share * load-balancing loss, when coef > 0
    ...
    metrics.update(router.take_metrics())     # once per step, on every rank (one all-reduce)

While a capture is open, a forward hook on each decoder layer's router (`mlp.gate`) keeps its
logits (tokens, experts): the values transformers collects with `output_router_logits=True`. Own
hooks rather than that flag because the packed forward (`lensrl.train.packing`) calls the model
itself, and because transformers' collector reads a ContextVar, which torch.compile cannot
trace (a graph break in every compiled decoder layer). Outside a capture the hooks do nothing:
no-grad passes (old and reference log-probabilities), generation and the recomputation of
activation checkpointing in the backward keep nothing.

The loss is transformers' `load_balancing_loss_func` (Switch Transformer, eq. 4-6; what
Qwen3-VL-MoE adds to its loss with `router_aux_loss_coef`) over the micro-batch's real tokens
(a padded batch's padding left out through its attention mask; the FSDP image anchor that a
micro-batch without images carries is counted with it). It depends on how the tokens are grouped
into micro-batches, as it does in transformers and Megatron. Token counts per expert are summed
over every capture of a step and over ranks:

    router/max_load_ratio        the busiest expert's tokens / the mean per expert, worst layer
                                 (1: perfectly even; num_experts / top_k: every token on the same experts)
    router/mean_max_load_ratio   the same ratio, mean over the MoE layers
    router/unused_expert_frac    (layer, expert) pairs that got no token in the step
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lensrl.train import distributed as dist


def moe_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The router (`mlp.gate`) of every sparse decoder layer, in layer order; empty for a dense model."""
    from lensrl.models.load import model_blocks

    _, layers = model_blocks(model)
    return [layer.mlp.gate for layer in layers if hasattr(layer.mlp, "experts") and hasattr(layer.mlp, "gate")]


@dataclass
class Routed:
    """What one capture saw: the load-balancing loss of its tokens (a 0-d tensor, with gradient to the
    routers when the recorder's coefficient is positive; 0.0 for a dense model or no tokens)."""

    aux_loss: torch.Tensor | float = 0.0
    num_tokens: int = 0  # real tokens routed in each MoE layer


class RouterRecorder:
    """Captures the router logits of a policy's training forwards (see module doc). `coef`: the
    load-balancing loss coefficient, None for the model config's `router_aux_loss_coef`; 0 for a
    model without experts."""

    def __init__(self, model: torch.nn.Module, coef: float | None = None):
        self.routers = moe_routers(model)
        text = model.config.get_text_config()
        self.num_experts = int(getattr(text, "num_experts", 0) or 0)
        self.top_k = int(getattr(text, "num_experts_per_tok", 0) or 0)
        if not self.routers:
            self.coef = 0.0
            if coef:  # set for a model without experts: say so rather than ignore it silently
                from lensrl.logging import console
                from lensrl.train.distributed import is_main

                if is_main():
                    console.print(f"[yellow]model.router_aux_loss_coef={coef} is ignored: the model has no experts "
                                  "(a router load-balancing loss exists only for mixture-of-experts models)[/yellow]")
        else:
            self.coef = float((getattr(text, "router_aux_loss_coef", None) or 0.0) if coef is None else coef)
        if not 0 <= self.coef < float("inf"):  # load_config checks the key; config.json's value is checked here
            from lensrl.config import ConfigError

            where = "router_aux_loss_coef in the model's config.json" if coef is None else "model.router_aux_loss_coef"
            raise ConfigError(f"{where} is {self.coef}; it must be a finite number >= 0"
                              + (": set model.router_aux_loss_coef (e.g. 0.001) to override it" if coef is None else ""))
        self.active = False
        self._logits: list[torch.Tensor] = []
        self._mask: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None  # (layers, experts) top-k slots of real tokens since take_metrics
        self._handles = [router.register_forward_hook(self._keep_logits) for router in self.routers]
        if self.routers:
            from lensrl.models.load import language_model

            self._handles.append(language_model(model).register_forward_pre_hook(self._keep_mask, with_kwargs=True))

    @property
    def enabled(self) -> bool:
        """Whether the model has routed experts."""
        return bool(self.routers)

    # Not traced by torch.compile (a graph break at each router): traced, its `if self.active` is
    # guarded, so a compiled decoder layer ran one graph in the captured forward (logits kept) and
    # another in activation checkpointing's recompute (nothing kept); the two saved different
    # tensors and the backward failed with a CheckpointError (Qwen3-VL-MoE GRPO step, H200, bf16).
    @torch.compiler.disable
    def _keep_logits(self, module, args, output) -> None:
        if self.active:
            self._logits.append(output[0])  # (tokens, experts): the router's logits

    def _keep_mask(self, module, args, kwargs) -> None:
        if self.active:
            mask = kwargs.get("attention_mask")
            self._mask = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None  # (B, T) of a padded batch

    @contextlib.contextmanager
    def capture(self) -> Iterator[Routed]:
        """Keep the router logits of the (one) forward run inside; on leaving, `Routed.aux_loss` holds
        the load-balancing loss of its real tokens and their top-k assignments are counted."""
        routed = Routed()
        if not self.routers:
            yield routed
            return
        self.active, self._logits, self._mask = True, [], None
        try:
            yield routed
        finally:
            self.active = False
            logits, mask = self._logits, self._mask
            self._logits, self._mask = [], None
        if not logits:
            return
        routed.num_tokens = int(mask.sum()) if mask is not None else int(logits[0].shape[0])
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.coef > 0):
            routed.aux_loss = load_balancing_loss(logits, self.num_experts, self.top_k, mask)
        self._count(logits, mask)

    def loss_term(self, routed: Routed, share: float, prefix: str) -> tuple[torch.Tensor | float, dict[str, float]]:
        """(coef * share * the capture's load-balancing loss, to add to the micro-batch's loss: 0.0 when
        coef is 0; {prefix/router_aux_loss: share * the loss}, empty for a dense model). `share`: the
        micro-batch's part of the mini-batch (its tokens over all micro-batches' on all ranks), so
        both sum over micro-batches and ranks to the mini-batch's token-weighted mean."""
        if not self.routers:
            return 0.0, {}
        aux = routed.aux_loss
        term = self.coef * share * aux if self.coef > 0 and isinstance(aux, torch.Tensor) else 0.0
        return term, {f"{prefix}/router_aux_loss": float(aux.detach() if isinstance(aux, torch.Tensor) else aux) * share}

    @torch.no_grad()
    def _count(self, logits: list[torch.Tensor], mask: torch.Tensor | None) -> None:
        if self.counts is None:
            self.counts = torch.zeros(len(self.routers), self.num_experts, dtype=torch.float64,
                                       device=logits[0].device)
        weight = None if mask is None else mask.reshape(-1, 1).to(self.counts.device, torch.float64)  # (N, 1)
        for i, layer_logits in enumerate(logits):  # one forward per capture: one entry per MoE layer
            layer = i % len(self.routers)
            probs = torch.softmax(layer_logits.float(), dim=-1)  # (N, E), as the router ranks the experts
            chosen = torch.topk(probs, self.top_k, dim=-1).indices  # (N, k)
            ones = torch.ones(chosen.shape, dtype=torch.float64, device=chosen.device)
            self.counts[layer].index_add_(0, chosen.flatten(), (ones if weight is None else ones * weight).flatten())

    def take_metrics(self) -> dict[str, float]:
        """The step's load statistics over every rank (a collective: every rank calls it, after the
        same captures or none), then reset. Empty for a dense model or a step without tokens."""
        if not self.routers:
            return {}
        counts = self.counts if self.counts is not None else torch.zeros(len(self.routers), self.num_experts,
                                                                            dtype=torch.float64)
        self.counts = None
        counts = dist.all_reduce_sum(counts).cpu()  # (layers, experts)
        used = counts.sum(-1) > 0
        if not bool(used.any()):
            return {}
        counts = counts[used]
        ratio = counts.max(-1).values / counts.mean(-1)  # (layers,)
        return {"router/max_load_ratio": float(ratio.max()), "router/mean_max_load_ratio": float(ratio.mean()),
                "router/unused_expert_frac": float((counts == 0).double().mean())}

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def load_balancing_loss(logits: list[torch.Tensor], num_experts: int, top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' Switch-Transformer load-balancing loss over the layers' router logits (each
    (tokens, experts)); `attention_mask` (B, T) leaves a padded batch's padding out. A 0-d float32
    tensor: num_experts * sum_e (fraction of top-k slots routed to e) * (mean router probability of e),
    which is top_k for perfectly even routing."""
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import load_balancing_loss_func

    # fp32 logits: transformers takes the softmax in the logits' dtype (bf16 under autocast)
    return load_balancing_loss_func(tuple(x.float() for x in logits), num_experts, top_k, attention_mask)
