"""The decode path's view of the policy's weights, and `sync` that keeps it current.

The engine runs the trainer's own parameters. Where a parameter already has the dtype decode
computes in, the engine holds a reference to it: the optimizer's in-place update is visible
with no copy at all. Two kinds of tensor are the engine's own, refreshed by `sync` with one
on-device copy each (never through the host):

  * the fused q/k/v projection (one matmul instead of three; 2.5% of a 3B model), and
  * every matmul weight whose dtype differs from the decode dtype, e.g. bf16 copies of fp32
    master weights when the trainer runs under autocast (gate and up are then fused too).

Norm weights and the embedding table stay references in the trainer's dtype: under autocast the
residual stream is fp32 exactly as in the trainer's forward, and only matmuls run in bf16.

A mixture-of-experts layer (Qwen3-VL-MoE's sparse block: `mlp.gate` the router, `mlp.experts`
the stacked experts) keeps its router weight as a matmul weight (above) and its stacked expert
tensors always as references in their own dtype, never copied: the experts are most of such a
model, and transformers' grouped experts forward computes them in the parameters' dtype under
autocast too (moe.py). Layers without experts keep the dense MLP fields.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lensrl.models.load import language_model


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # (H,)
    post_norm: torch.Tensor  # (H,)
    qkv_weight: torch.Tensor  # ((NH + 2 * KVH) * D, H), engine-owned
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None  # (D,) Qwen3-VL only
    k_norm: torch.Tensor | None
    o_weight: torch.Tensor  # (H, NH * D)
    o_bias: torch.Tensor | None
    # dense MLP (None in a mixture-of-experts layer)
    gate_up_weight: torch.Tensor | None  # (2I, H) when the engine owns its MLP copy, else None
    gate_weight: torch.Tensor | None  # (I, H) references otherwise
    up_weight: torch.Tensor | None
    down_weight: torch.Tensor | None  # (H, I)
    # mixture of experts (None in a dense layer)
    router_weight: torch.Tensor | None = None  # (E, H) in the decode dtype
    experts_gate_up: torch.Tensor | None = None  # (E, 2I_e, H) the model's own tensor
    experts_down: torch.Tensor | None = None  # (E, H, I_e) the model's own tensor

    @property
    def is_moe(self) -> bool:
        return self.router_weight is not None


@dataclass(frozen=True)
class TextShape:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    rms_norm_eps: float
    hidden_act: str
    qk_norm: bool
    # mixture of experts: 0 for a dense model
    num_experts: int = 0  # E
    num_experts_per_tok: int = 0  # K, the router's top-k
    moe_intermediate_size: int = 0  # I_e, one expert's MLP width
    num_moe_layers: int = 0  # decoder layers with experts (the others have a dense MLP)


def text_shape(model: torch.nn.Module) -> TextShape:
    lm = language_model(model)
    config = lm.config
    attn = lm.layers[0].self_attn
    moe_layers = [layer.mlp for layer in lm.layers if _is_moe(layer.mlp)]
    experts = moe_layers[0].experts if moe_layers else None
    return TextShape(
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=attn.head_dim,
        intermediate_size=config.intermediate_size,
        num_layers=len(lm.layers),
        vocab_size=model.lm_head.weight.shape[0],
        rms_norm_eps=float(config.rms_norm_eps),
        hidden_act=str(config.hidden_act),
        qk_norm=hasattr(attn, "q_norm"),
        num_experts=experts.gate_up_proj.shape[0] if experts is not None else 0,
        num_experts_per_tok=int(config.num_experts_per_tok) if experts is not None else 0,
        moe_intermediate_size=experts.down_proj.shape[2] if experts is not None else 0,
        num_moe_layers=len(moe_layers),
    )


def _is_moe(mlp: torch.nn.Module) -> bool:
    """A sparse block with a router (`gate`) and stacked experts (transformers 5 layout)."""
    return hasattr(mlp, "experts") and hasattr(mlp, "gate")


class DecodeWeights:
    """Per-layer weights of the decode path (see module doc).

    matmul_dtype: the dtype every matmul runs in (the trainer's autocast dtype, else its parameter
    dtype). copy_all: own a copy of everything (isolates the engine from in-place updates until
    `sync`; used by tests).
    """

    def __init__(self, model: torch.nn.Module, matmul_dtype: torch.dtype, copy_all: bool = False):
        self.matmul_dtype = matmul_dtype
        self.copy_all = copy_all
        self.shape = text_shape(model)
        self._owned: dict[str, torch.Tensor] = {}
        self.layers: list[LayerWeights] = []
        self.fingerprint: tuple[int, ...] = ()
        self.sync(model)

    @torch.no_grad()
    def sync(self, model: torch.nn.Module) -> bool:
        """Point at `model`'s current parameters and refresh the engine-owned copies.

        Returns True when any tensor the decode path reads moved to a new address (the
        captured CUDA graphs must then be recaptured).
        """
        lm = language_model(model)
        copies: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self.embed = self._keep("embed", lm.embed_tokens.weight, copies)
        self.final_norm = self._keep("final_norm", lm.norm.weight, copies)
        self.lm_head = self._matmul("lm_head", model.lm_head.weight, copies)
        self.lm_head_bias = self._matmul_opt("lm_head_bias", model.lm_head.bias, copies)
        self.layers = [self._layer(i, layer, copies) for i, layer in enumerate(lm.layers)]
        rotary = lm.rotary_emb
        self.inv_freq = rotary.inv_freq.detach().float()  # (D / 2,)
        self.rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        if copies[0]:
            torch._foreach_copy_(copies[0], copies[1])
        fingerprint = tuple(t.data_ptr() for t in self._tensors())
        moved = fingerprint != self.fingerprint
        self.fingerprint = fingerprint
        return moved

    @property
    def residual_dtype(self) -> torch.dtype:
        """The residual stream's dtype: the embedding's, as in the trainer's forward."""
        return self.embed.dtype

    def owned_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._owned.values())

    # ------------------------------------------------------------------ internals

    def _layer(self, i: int, layer: torch.nn.Module, copies) -> LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        p = f"{i}."
        qkv = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
        qkv_bias = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
        return LayerWeights(
            input_norm=self._keep(p + "input_norm", layer.input_layernorm.weight, copies),
            post_norm=self._keep(p + "post_norm", layer.post_attention_layernorm.weight, copies),
            qkv_weight=self._fused(p + "qkv", qkv, copies),
            qkv_bias=self._fused(p + "qkv_bias", qkv_bias, copies) if qkv_bias[0] is not None else None,
            q_norm=self._keep(p + "q_norm", attn.q_norm.weight, copies) if hasattr(attn, "q_norm") else None,
            k_norm=self._keep(p + "k_norm", attn.k_norm.weight, copies) if hasattr(attn, "k_norm") else None,
            o_weight=self._matmul(p + "o", attn.o_proj.weight, copies),
            o_bias=self._matmul_opt(p + "o_bias", attn.o_proj.bias, copies),
            **(self._experts(p, mlp, copies) if _is_moe(mlp) else self._dense_mlp(p, mlp, copies)),
        )

    def _dense_mlp(self, p: str, mlp: torch.nn.Module, copies) -> dict:
        own = self.copy_all or mlp.gate_proj.weight.dtype != self.matmul_dtype
        return dict(
            gate_up_weight=self._fused(p + "gate_up", [mlp.gate_proj.weight, mlp.up_proj.weight], copies)
            if own
            else None,
            gate_weight=None if own else mlp.gate_proj.weight.detach(),
            up_weight=None if own else mlp.up_proj.weight.detach(),
            down_weight=self._matmul(p + "down", mlp.down_proj.weight, copies),
        )

    def _experts(self, p: str, mlp: torch.nn.Module, copies) -> dict:
        """Router in the decode dtype; the stacked experts by reference (copies only with copy_all)."""
        return dict(
            gate_up_weight=None,
            gate_weight=None,
            up_weight=None,
            down_weight=None,
            router_weight=self._matmul(p + "router", mlp.gate.weight, copies),
            experts_gate_up=self._keep(p + "experts_gate_up", mlp.experts.gate_up_proj, copies),
            experts_down=self._keep(p + "experts_down", mlp.experts.down_proj, copies),
        )

    def _buffer(self, name: str, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buffer = self._owned.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype or buffer.device != device:
            buffer = torch.empty(shape, dtype=dtype, device=device)
            self._owned[name] = buffer
        return buffer

    def _keep(self, name: str, param: torch.Tensor, copies) -> torch.Tensor:
        """A reference in the parameter's own dtype (a copy when copy_all)."""
        param = param.detach()
        if not self.copy_all:
            return param
        buffer = self._buffer(name, param.shape, param.dtype, param.device)
        copies[0].append(buffer)
        copies[1].append(param)
        return buffer

    def _matmul(self, name: str, param: torch.Tensor, copies) -> torch.Tensor:
        """A matmul weight in the decode dtype: a reference when it already is, else a copy."""
        param = param.detach()
        if param.dtype == self.matmul_dtype and not self.copy_all:
            return param
        buffer = self._buffer(name, param.shape, self.matmul_dtype, param.device)
        copies[0].append(buffer)
        copies[1].append(param)
        return buffer

    def _matmul_opt(self, name: str, param: torch.Tensor | None, copies) -> torch.Tensor | None:
        return None if param is None else self._matmul(name, param, copies)

    def _fused(self, name: str, params: list[torch.Tensor], copies) -> torch.Tensor:
        """Parameters concatenated along dim 0 into an engine-owned buffer in the decode dtype."""
        params = [p.detach() for p in params]
        rows = sum(p.shape[0] for p in params)
        buffer = self._buffer(
            name, torch.Size([rows, *params[0].shape[1:]]), self.matmul_dtype, params[0].device
        )
        start = 0
        for p in params:
            copies[0].append(buffer[start : start + p.shape[0]])
            copies[1].append(p)
            start += p.shape[0]
        return buffer

    def _tensors(self) -> list[torch.Tensor]:
        out = [self.embed, self.final_norm, self.lm_head]
        for layer in self.layers:
            out += [t for t in vars(layer).values() if isinstance(t, torch.Tensor)]
        return out
