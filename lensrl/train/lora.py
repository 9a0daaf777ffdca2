"""LoRA on the policy, with peft: adapters injected in place, trained alone; the base is the reference.

    add_lora(policy, cfg.model.lora, seed)  # Linear -> peft lora.Linear in the language model
    with adapters_disabled(policy):         # the base model: GRPO's KL reference, no second copy
        ref_logp = ...
    merged_weight(layer)                    # W + (alpha / r) * B @ A of one layer, fp32, on its device
    merged_state_dict(policy, state=state)  # every weight merged, under the original names
    save_adapter(policy, out_dir, base, state)  # a folder `PeftModel.from_pretrained(base, out_dir)` loads

`peft.inject_adapter_in_model` replaces each targeted `nn.Linear` by peft's `lora.Linear` (the
original weight stays, as `base_layer.weight`, frozen) and leaves the module tree otherwise as it
was, so everything that reads `model.model`, `model.lm_head` or the decoder layers keeps working;
only the adapters (`lora_A`, `lora_B`, fp32) require gradients. LoRA's update is
h = W x + (alpha / r) * B A x (Hu et al. 2021, "LoRA", eq. 3), B initialised to 0, so the step-0
policy equals the base model; A is drawn from `seed`, the same on every rank.

Where the merged weights go:
  * the rollout engine decodes from plain weights (peft's layers would go unseen), so it generates
    with a plain copy of the policy (`lensrl.train.fsdp.RolloutCopy`) whose adapted weights are
    `merged_weight`s, rewritten on the device after every update (fp32, then the rollout dtype),
    and whose other weights are the policy's own tensors (one rank, unsharded: the frozen base
    is shared, never copied; sharded or in another dtype: copied once, being frozen);
  * under FSDP2 the frozen base and the adapters are sharded together, one unit per block; the
    copy gathers a unit, merges its layers and reshards it;
  * `hf/` and `hf_adapter/` are written from the gathered state (`merged_state_dict`,
    `save_adapter`), on any number of ranks.
The `hf` rollout backend on one rank generates with the peft model itself: its forward is the
trainer's, the reference the merged copy is tested against, and it needs no copy at all.

Targets: `LoraSettings.target_modules` names (default: the language model's attention and MLP
projections) matched inside the language model only, or in the vision tower too with
`vision_tower=True`; only `nn.Linear` layers (anything else is refused).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from lensrl.config import ConfigError

ADAPTER = "default"  # peft's name of the one adapter


def target_regex(cfg) -> str:
    """peft's `target_modules` as a full-match regex: the named projections inside the language
    model (and the vision tower when cfg.vision_tower)."""
    where = "(language_model|visual)" if cfg.vision_tower else "language_model"
    names = "|".join(sorted(set(cfg.target_modules)))
    return rf".*{where}\..*\.({names})"


def add_lora(model: torch.nn.Module, cfg, seed: int = 0) -> int:
    """Inject LoRA adapters (rank cfg.rank, scale cfg.alpha / cfg.rank, dropout cfg.dropout) into
    `model` in place and freeze everything else. Returns the number of trainable parameters.
    A (r, in) is drawn from a generator seeded with `seed` (the global RNG is left as it was): every
    rank must pass the same seed, since FSDP shards each rank's adapters as if they were everyone's.
    Raises ConfigError when no module matches the targets, a match is not an nn.Linear, or peft
    is missing."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        raise ConfigError("model.lora needs peft: pip install 'lensrl[lora]'") from None

    check_targets(model, cfg)
    peft_cfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=target_regex(cfg), bias="none")
    model.requires_grad_(False)
    try:
        with torch.random.fork_rng(devices=[]):  # peft initialises A on the CPU, from the global generator
            torch.default_generator.manual_seed(seed)
            inject_adapter_in_model(peft_cfg, model, adapter_name=ADAPTER)
    except ValueError as e:
        raise ConfigError(f"model.lora.target_modules={list(cfg.target_modules)} matched no module of the model "
                          f"({e})") from None
    other = [name for name, module in model.named_modules() if _is_lora(module) and not isinstance(module, LoraLinear)]
    if other:
        raise ConfigError(f"model.lora.target_modules={list(cfg.target_modules)} matches {other[0]} "
                          f"({type(model.get_submodule(other[0]).get_base_layer()).__name__}): LoRA is supported on "
                          "Linear layers only; name Linear projections in target_modules")
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
            param.data = param.data.float()  # fp32 adapters over a base of any dtype
    narrow = min((min(m.in_features, m.out_features), name) for name, m in model.named_modules()
                 if isinstance(m, LoraLinear) for m in [m.get_base_layer()])
    if cfg.rank > narrow[0]:
        import warnings

        warnings.warn(f"model.lora.rank={cfg.rank} is above the width of {narrow[1]} ({narrow[0]}): B A cannot "
                      f"have a rank above {narrow[0]} there, so the extra rank only adds parameters and compute; "
                      "a rank at most the smallest adapted width gives the same capacity", stacklevel=2)
    model.lensrl_lora = cfg  # what save_adapter writes into adapter_config.json
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_targets(model: torch.nn.Module, cfg) -> None:
    """Every name in cfg.target_modules matches at least one module where LoRA goes (the language
    model, and the vision tower with cfg.vision_tower), and every match is an nn.Linear. Raises
    ConfigError naming the first name that matches nothing (a typo would otherwise train fewer
    projections without a word; the default list is exempt, see below) or a match of another type."""
    import re

    from lensrl.config import LoraSettings

    where = "(language_model|visual)" if cfg.vision_tower else "language_model"
    modules = dict(model.named_modules())
    # the default list names the projections of every architecture: a MoE's decoder has no
    # gate/up/down_proj Linear (its experts are stacked), so only a list of the user's own is held to each name
    default = sorted(cfg.target_modules) == sorted(LoraSettings().target_modules)
    for target in cfg.target_modules:
        matches = [name for name in modules if re.fullmatch(rf".*{where}\..*\.{re.escape(target)}", name)]
        if not matches and default:
            continue
        if not matches:
            linear = _linear_names(modules, where)
            experts = " (its MLPs are stacked experts, which LoRA does not adapt)" if any(
                name.endswith(".mlp.experts") for name in modules) else ""
            raise ConfigError(f"model.lora.target_modules: {target!r} names no module of the "
                              f"{'language model or vision tower' if cfg.vision_tower else 'language model'}"
                              f"{experts}; its Linear projections: {', '.join(linear)}")
        other = next((name for name in matches if not isinstance(modules[name], torch.nn.Linear)), None)
        if other is not None:
            raise ConfigError(f"model.lora.target_modules: {target!r} names {other} "
                              f"({type(modules[other]).__name__}), not a Linear layer; LoRA adapts Linear "
                              "projections only (e.g. q_proj, gate_proj)")
    if cfg.vision_tower:  # the names differ by architecture: Qwen3-VL's vision MLP is linear_fc1/linear_fc2
        names = "|".join(re.escape(t) for t in cfg.target_modules)
        if not any(re.fullmatch(rf".*visual\..*\.({names})", name) for name in modules):
            linear = _linear_names(modules, "visual")
            raise ConfigError(f"model.lora.vision_tower=true, but no name in model.lora.target_modules="
                              f"{list(cfg.target_modules)} is a layer of this model's vision tower, so nothing "
                              f"in it would train; its Linear projections: {', '.join(linear)} (add those to adapt)")


def _linear_names(modules: dict[str, torch.nn.Module], where: str) -> list[str]:
    """The last name parts of the Linear layers under `where` (a regex: "language_model", "visual")
    that a target_modules entry can name: a name is offered when every module it matches there is
    Linear (`proj` also names the patch embedding's Conv3d), block indices left out."""
    import re

    linear: dict[str, bool] = {}
    for name, m in modules.items():
        if re.fullmatch(rf".*{where}\..*", name):
            key = name.rsplit(".", 1)[-1]
            linear[key] = linear.get(key, True) and isinstance(m, torch.nn.Linear)
    return sorted(k for k, ok in linear.items() if ok and not k.isdigit())


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """peft's LoRA layers of `model` (empty when it has none)."""
    return [m for m in model.modules() if _is_lora(m)]


def _is_lora(module: torch.nn.Module) -> bool:
    lora = sys.modules.get("peft.tuners.lora")  # not imported: no LoRA layer exists (peft is optional)
    return lora is not None and isinstance(module, lora.LoraLayer)


def has_lora(model: torch.nn.Module) -> bool:
    return bool(lora_layers(model))


def lora_scales(model: torch.nn.Module) -> dict[str, float]:
    """{module name: alpha / r} of every LoRA layer of `model` (its base weight is
    `<name>.base_layer.weight`, `<name>.weight` once merged)."""
    return {name: float(m.scaling[ADAPTER]) for name, m in model.named_modules() if _is_lora(m)}


def plain_name(name: str) -> str | None:
    """A LoRA model's parameter name as the model without LoRA has it (`...q_proj.base_layer.weight`
    -> `...q_proj.weight`); None for an adapter's own tensors."""
    if ".lora_" in name:
        return None
    return name.replace(".base_layer.", ".")


def merge(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B @ A in fp32 on W's device: weight (out, in), lora_a (r, in), lora_b (out, r)
    -> (out, in). Whole tensors (under FSDP: gathered ones)."""
    return torch.addmm(weight.float(), lora_b.float(), lora_a.float(), alpha=scale)


def merged_weight(layer: torch.nn.Module) -> torch.Tensor:
    """One peft `lora.Linear`'s merged weight, (out, in) fp32 on its device (`merge`). Under FSDP the
    layer's unit must be unsharded."""
    return merge(layer.get_base_layer().weight, layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight,
                 float(layer.scaling[ADAPTER]))


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Inside, `model` computes as its base (every adapter off); restored on leaving. The adapters
    keep `requires_grad` (peft's switch clears it; FSDP2 reads it when it first runs a unit)."""
    layers = lora_layers(model)
    adapters = [p for layer in layers for p in layer.parameters() if p.requires_grad]
    for layer in layers:
        layer.enable_adapters(False)
    for param in adapters:
        param.requires_grad_(True)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None, *,
                      state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's weights with every adapter merged (`merge`, in W's dtype unless `dtype`), under
    the names the model has without LoRA: what `save_pretrained` writes and plain transformers
    loads. `state`: the model's full (gathered) state dict; default `model.state_dict()` (an
    unsharded model only)."""
    state = model.state_dict() if state is None else state
    merged: dict[str, torch.Tensor] = {}
    scales = {f"{name}.base_layer.weight": (name, scale) for name, scale in lora_scales(model).items()}
    for name, tensor in state.items():
        plain = plain_name(name)
        if plain is None:
            continue
        value = tensor
        if name in scales:
            layer, scale = scales[name]
            value = merge(tensor, state[f"{layer}.lora_A.{ADAPTER}.weight"], state[f"{layer}.lora_B.{ADAPTER}.weight"],
                          scale)  # fp32: cast once, to `dtype` (a bf16 W would round the update away first)
        merged[plain] = value.to(dtype if dtype is not None else tensor.dtype)
    return merged


def adapter_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapters' tensors under the names peft saves them (`base_model.model.<module>.lora_A.weight`).
    `state`: the model's full (gathered) state dict; default `model.state_dict()`."""
    from peft import get_peft_model_state_dict

    return {f"base_model.model.{k}": v.detach().contiguous() for k, v in
            get_peft_model_state_dict(model, state_dict=state, adapter_name=ADAPTER).items()}


def save_adapter(model: torch.nn.Module, out_dir: str | Path, base_model: str,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """A peft adapter folder (adapter_config.json + adapter_model.safetensors) that
    `PeftModel.from_pretrained(<base model>, out_dir)` loads onto `base_model`. `state`: as for
    `adapter_state_dict`."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    cfg = model.lensrl_lora
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_cfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=target_regex(cfg), bias="none", base_model_name_or_path=str(base_model))
    peft_cfg.save_pretrained(str(out_dir))
    save_file(adapter_state_dict(model, state), str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir
