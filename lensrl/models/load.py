"""Load a policy: a Hugging Face Qwen-VL folder (downloaded or tiny) or a named benchmark shape.

    model, processor = load_policy("runs/tiny_model")            # tiny or downloaded folder
    model, processor = load_policy("qwen2_5_vl_3b", torch.bfloat16, "cuda")  # random weights

Folders load with transformers' own classes (safetensors only, no remote code). Shapes are
built on the meta device and materialised directly on the target device in the target dtype,
so a 3B model appears on a GPU in about a second with no fp32 copy on the host.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from lensrl.models.processor import Processor
from lensrl.models.shapes import ARCHITECTURES, SHAPES, model_class, shape_config, shape_dir

_HOW_TO_GET_ONE = (
    "create a tiny test model with `lensrl model tiny --out DIR`, download a Qwen-VL checkpoint "
    "(e.g. `hf download Qwen/Qwen2.5-VL-3B-Instruct --local-dir DIR`), or name a benchmark shape "
    f"({', '.join(SHAPES)})"
)


def detect_arch(path: str | Path) -> str:
    """The model_type ("qwen2_5_vl" or "qwen3_vl") of a model folder, from its config.json.

    Raises FileNotFoundError (saying how to get a model) or ValueError naming what was found.
    """
    path = Path(path)
    config_path = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist; {_HOW_TO_GET_ONE}")
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{path} has no config.json, so it is not a Hugging Face model folder; {_HOW_TO_GET_ONE}"
        )
    with open(config_path) as f:
        config = json.load(f)
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type in ARCHITECTURES:
        return model_type
    for arch, class_name in ARCHITECTURES.items():  # older exports name only the class
        if class_name in architectures:
            return arch
    supported = ", ".join(f"{arch} ({name})" for arch, name in ARCHITECTURES.items())
    raise ValueError(
        f"{config_path}: unsupported architecture: model_type={model_type!r}, architectures={architectures}; "
        f"lensrl supports {supported}"
    )


def load_policy(
    path_or_shape: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> tuple[PreTrainedModel, Processor]:
    """(model, processor) for a model folder or a shape name (see module doc).

    The model is in eval mode on `device` with parameters in `dtype`; `min_pixels`/`max_pixels`
    override the folder's image-resize bounds.
    """
    name = str(path_or_shape)
    pixels = {"min_pixels": min_pixels, "max_pixels": max_pixels}
    if name in SHAPES and not Path(name).exists():
        model = build_random_model(shape_config(name), dtype, device)
        return model, Processor.from_pretrained(shape_dir(name), **pixels)
    arch = detect_arch(name)
    _require_safetensors(Path(name))
    model = model_class(arch).from_pretrained(
        name, dtype=dtype, trust_remote_code=False, use_safetensors=True
    )
    model = model.to(device).eval()
    return model, Processor.from_pretrained(name, **pixels)


def language_model(model: nn.Module) -> nn.Module:
    """The decoder stack of a Qwen2.5-VL / Qwen3-VL `*ForConditionalGeneration`."""
    inner = model.model
    return getattr(inner, "language_model", inner)


def model_blocks(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(vision blocks, decoder layers): the repeated units FSDP shards and torch.compile compiles."""
    return list(model.model.visual.blocks), list(language_model(model).layers)


def build_random_model(
    config,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    std: float = 0.02,
) -> PreTrainedModel:
    """A model for `config` with normal(0, std) weights made directly on `device` in `dtype`.

    Parameters are created on the meta device (no memory, no init), then each is allocated on
    `device` and initialised there: linear/conv/embedding weights normal(0, std), biases 0, norm
    weights 1. Buffers (rotary frequencies) are computed for real while building, as the model
    itself computes them, and moved to `device` unchanged.
    """
    device = torch.device(device)
    with _parameters_on_meta():
        model = model_class(config.model_type)(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    materialised: dict[int, nn.Parameter] = {}  # id(meta param) -> real param: keeps tied weights tied
    for module in model.modules():
        for param_name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in materialised:
                materialised[id(param)] = nn.Parameter(
                    _random_like(param, param_name, dtype, device, generator, std),
                    requires_grad=param.requires_grad,
                )
            module._parameters[param_name] = materialised[id(param)]
    for module in model.modules():
        for buffer_name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[buffer_name] = buffer.to(device)
    config.dtype = dtype
    return model.eval()


def _random_like(
    param: torch.Tensor,
    name: str,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
    std: float,
) -> torch.Tensor:
    dtype = dtype if param.dtype.is_floating_point else param.dtype
    tensor = torch.empty(param.shape, dtype=dtype, device=device)
    if name == "bias":
        return tensor.zero_()
    if param.ndim == 1:  # RMSNorm / LayerNorm weights
        return tensor.fill_(1.0)
    return tensor.normal_(0.0, std, generator=generator)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Register every new parameter on the meta device; buffers stay real.

    Each layer's parameter is allocated and moved to meta right away, so the host never holds more
    than one layer's worth (accelerate's `init_empty_weights(include_buffers=False)` trick).
    """
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _require_safetensors(path: Path) -> None:
    if any(path.glob("*.safetensors")):
        return
    found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    detail = f" (found {', '.join(found)}; lensrl does not load pickled weights)" if found else ""
    raise FileNotFoundError(f"{path} has no *.safetensors weights{detail}; {_HOW_TO_GET_ONE}")
