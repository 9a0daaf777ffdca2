"""LoRA on the policy, with peft: adapters injected in place, trained alone; the base is the reference.

    add_lora(policy, cfg.model.lora)        # Linear -> peft lora.Linear in the language model
    with adapters_disabled(policy):         # the base model: GRPO's KL reference, no second copy
        ref_logp = ...
    merged_state_dict(policy)               # W + (alpha / r) * B @ A under the original names
    save_adapter(policy, cfg, out_dir)      # a folder `PeftModel.from_pretrained(base, out_dir)` loads

`peft.inject_adapter_in_model` replaces each targeted `nn.Linear` by peft's `lora.Linear` (the
original weight stays, as `base_layer.weight`, frozen) and leaves the module tree otherwise as it
was, so everything that reads `model.model`, `model.lm_head` or the decoder layers keeps working;
only the adapters (`lora_A`, `lora_B`, fp32) require gradients. LoRA's update is
h = W x + (alpha / r) * B A x (Hu et al. 2021, "LoRA", eq. 3), B initialised to 0, so the step-0
policy equals the base model.

Targets: `LoraSettings.target_modules` names (default: the language model's attention and MLP
projections) matched inside the language model only, or in the vision tower too with
`vision_tower=True`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

ADAPTER = "default"  # peft's name of the one adapter


def target_regex(cfg) -> str:
    """peft's `target_modules` as a full-match regex: the named projections inside the language
    model (and the vision tower when cfg.vision_tower)."""
    where = "(language_model|visual)" if cfg.vision_tower else "language_model"
    names = "|".join(sorted(set(cfg.target_modules)))
    return rf".*{where}\..*\.({names})"


def add_lora(model: torch.nn.Module, cfg) -> int:
    """Inject LoRA adapters (rank cfg.rank, scale cfg.alpha / cfg.rank, dropout cfg.dropout) into
    `model` in place and freeze everything else. Returns the number of trainable parameters.
    Raises ValueError when no module matches the targets, ConfigError when peft is missing."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        from lensrl.config import ConfigError

        raise ConfigError("model.lora needs peft: pip install 'lensrl[lora]'") from None

    peft_cfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=target_regex(cfg), bias="none")
    model.requires_grad_(False)
    try:
        inject_adapter_in_model(peft_cfg, model, adapter_name=ADAPTER)
    except ValueError as e:
        raise ValueError(f"model.lora.target_modules={list(cfg.target_modules)} matched no module of the model "
                         f"({e})") from None
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
            param.data = param.data.float()  # fp32 adapters over a base of any dtype
    model.lensrl_lora = cfg  # what save_adapter writes into adapter_config.json
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """peft's LoRA layers of `model` (empty when it has none)."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def has_lora(model: torch.nn.Module) -> bool:
    return bool(lora_layers(model))


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Inside, `model` computes as its base (every adapter off); restored on leaving."""
    layers = lora_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights with every adapter merged (W + scale * B @ A, in W's dtype unless
    `dtype`), under the names the model has without LoRA: what `save_pretrained` writes and plain
    transformers loads."""
    from peft.tuners.lora import LoraLayer

    merged: dict[str, torch.Tensor] = {}
    deltas = {f"{name}.base_layer.weight": module.get_delta_weight(ADAPTER)
              for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    for name, tensor in model.state_dict().items():
        if "lora_" in name:
            continue
        value = tensor
        if name in deltas:
            value = (tensor.float() + deltas[name].float()).to(tensor.dtype)
        merged[name.replace(".base_layer.", ".")] = value.to(dtype) if dtype is not None else value
    return merged


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors under the names peft saves them (`base_model.model.<module>.lora_A.weight`)."""
    from peft import get_peft_model_state_dict

    return {f"base_model.model.{k}": v.detach().contiguous() for k, v in
            get_peft_model_state_dict(model, adapter_name=ADAPTER).items()}


def save_adapter(model: torch.nn.Module, out_dir: str | Path, base_model: str) -> Path:
    """A peft adapter folder (adapter_config.json + adapter_model.safetensors) that
    `PeftModel.from_pretrained(<base model>, out_dir)` loads onto `base_model`."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    cfg = model.lensrl_lora
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_cfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=target_regex(cfg), bias="none", base_model_name_or_path=str(base_model))
    peft_cfg.save_pretrained(str(out_dir))
    save_file(adapter_state_dict(model), str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir
