"""A tiny byte-level BPE tokenizer with Qwen's special tokens and chat template.

Tiny test models need a tokenizer that loads with plain `AutoTokenizer`, behaves like Qwen's
(same pre-tokenizer, same special tokens, same chat template), and is small enough that the
embedding does not dominate a 1M-parameter model. `train_tokenizer` trains one in about a second
on text generated here (geometry problems, LaTeX answers, multiple choice, lensrl's instructions),
so nothing is downloaded and the result is the same on every run.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer rebuilds exactly this pipeline on load,
# so the tokenizer.json must use it too or encodings would change between save and load).
PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Qwen's special tokens in Qwen's order: appended after the learned vocabulary, as in Qwen where
# <|endoftext|> is the first id after the BPE vocabulary.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2-VL's chat template: content is a string or a list of {"type": "image"} / {"type": "text"}
# items; each image becomes <|vision_start|><|image_pad|><|vision_end|>; a default system prompt is
# added when the conversation has none.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL's conventions: no default system prompt (its releases add none); the thinking
# variants open the assistant turn with "<think>\n", so a completion starts inside the thought.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN3_THINKING_CHAT_TEMPLATE = QWEN3_CHAT_TEMPLATE.replace(
    "<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>\n{% endif %}")
CHAT_TEMPLATES = {"qwen2_5_vl": CHAT_TEMPLATE, "qwen3_vl": QWEN3_CHAT_TEMPLATE, "qwen3_vl_moe": QWEN3_CHAT_TEMPLATE,
                  "qwen3_vl_thinking": QWEN3_THINKING_CHAT_TEMPLATE}

INSTRUCTIONS = [
    "You FIRST think about the reasoning process as an internal monologue and then provide the final "
    "answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE "
    "put in \\boxed{}.",
    "Solve the following math problem step by step. The last line of your response should be of the "
    "form Answer: \\boxed{$Answer}.",
    "Answer with the option's letter from the given choices directly.",
    DEFAULT_SYSTEM_PROMPT,
]

_SHAPES = [
    "triangle",
    "circle",
    "square",
    "rectangle",
    "parallelogram",
    "trapezoid",
    "rhombus",
    "polygon",
    "hexagon",
    "pentagon",
    "sector",
    "cube",
    "cylinder",
    "cone",
    "sphere",
    "cup",
    "block",
    "bowl",
]
_COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "gray", "brown"]
_QUANTITIES = [
    "area",
    "perimeter",
    "length",
    "height",
    "radius",
    "diameter",
    "circumference",
    "volume",
    "measure",
    "value",
    "side length",
    "hypotenuse",
]
_UNITS = ["cm", "m", "mm", "in", "ft", "units", "yd"]
_POINTS = list("ABCDEFGHJKLMNPQRSTWXYZ")
_DIRECTIONS = ["left", "right", "above", "below", "in front of", "behind", "closer", "farther"]
_ROBOT = [
    "Is the robot's gripper open?",
    "Which object is closest to the gripper?",
    "What will the robot arm do next?",
    "Is the drawer open or closed?",
    "Has the robot grasped the object?",
    "Where should the gripper move to pick up the",
]


def _number(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.5:
        return str(rng.randint(0, 200))
    if kind < 0.75:
        return f"{rng.uniform(0, 100):.{rng.choice([1, 2])}f}"
    return str(rng.randint(1, 9))


def _latex(rng: random.Random) -> str:
    a, b = rng.randint(1, 30), rng.randint(2, 12)
    return rng.choice(
        [
            f"\\frac{{{a}}}{{{b}}}",
            f"{b}\\sqrt{{{a}}}",
            f"\\sqrt{{{a}}}",
            f"{a}^\\circ",
            f"{a}°",
            f"{a}\\pi",
            f"\\frac{{{a}\\sqrt{{{b}}}}}{{{b}}}",
            f"{a}.{b}",
            f"x = {a}",
            f"m \\angle {rng.choice(_POINTS)} = {a}",
            f"\\angle {rng.choice(_POINTS)}{rng.choice(_POINTS)}{rng.choice(_POINTS)}",
            f"{a}^{{2}} + {b}^{{2}}",
            f"\\triangle {rng.choice(_POINTS)}{rng.choice(_POINTS)}{rng.choice(_POINTS)}",
            f"\\odot {rng.choice(_POINTS)}",
        ]
    )


def _problem(rng: random.Random) -> str:
    shape, colour, quantity = rng.choice(_SHAPES), rng.choice(_COLOURS), rng.choice(_QUANTITIES)
    p, q = rng.choice(_POINTS), rng.choice(_POINTS)
    return rng.choice(
        [
            "Find x.",
            f"Find the {quantity} of the {shape}. Round to the nearest tenth.",
            f"Find the {quantity} of the {shape}. Round to the nearest hundredth if necessary.",
            f"In {_latex(rng)}, {_latex(rng)}. Find {_latex(rng)}.",
            f"The {quantity} of the {shape} is {_number(rng)} {rng.choice(_UNITS)}. Find the {rng.choice(_QUANTITIES)}.",
            f"Find the measure of \\angle {rng.randint(1, 9)}.",
            f"Find {p}{q}. Assume that segments that appear to be tangent are tangent.",
            f"How many {colour} {shape}s are there?",
            f"How many objects are {rng.choice(_DIRECTIONS)} the {colour} {shape}?",
            f"Is the {colour} {shape} {rng.choice(_DIRECTIONS)} the {rng.choice(_COLOURS)} {rng.choice(_SHAPES)}?",
            f"What color is the {shape} {rng.choice(_DIRECTIONS)} the {rng.choice(_SHAPES)}?",
            f"{rng.choice(_ROBOT)} {colour} {shape}",
            f"If {p}{q} = {_number(rng)}, what is the {quantity} of {_latex(rng)}?",
            f"Use parallelogram {''.join(rng.sample(_POINTS, 4))} to find {_latex(rng)}.",
            f"Solve for x: {rng.randint(2, 9)}x + {rng.randint(1, 50)} = {rng.randint(50, 200)}.",
        ]
    )


def _choices(rng: random.Random) -> str:
    pool = rng.choice(
        [_DIRECTIONS, _COLOURS, _SHAPES, [_number(rng) for _ in range(5)], [_latex(rng) for _ in range(5)]]
    )
    options = rng.sample(pool, min(len(pool), rng.randint(2, 5)))
    return "\n".join(f"{letter}. {option}" for letter, option in zip("ABCDE", options))


def _response(rng: random.Random) -> str:
    steps = " ".join(
        rng.choice(
            [
                f"The {rng.choice(_QUANTITIES)} is {_number(rng)}.",
                f"So {_latex(rng)} = {_latex(rng)}.",
                f"Since {rng.choice(_POINTS)}{rng.choice(_POINTS)} = {_number(rng)}, we have x = {_number(rng)}.",
                f"Let me think about the {rng.choice(_SHAPES)} first.",
                "By the Pythagorean theorem, a^2 + b^2 = c^2.",
                "Therefore the answer follows.",
            ]
        )
        for _ in range(rng.randint(1, 4))
    )
    answer = rng.choice([_number(rng), _latex(rng), rng.choice("ABCDE")])
    return rng.choice(
        [
            f"<think>\n{steps}\n</think>\n\\boxed{{{answer}}}",
            f"<think> {steps} </think> The final answer is \\boxed{{{answer}}}.",
            f"{steps}\nAnswer: \\boxed{{{answer}}}",
            f"The answer is {rng.choice('ABCDE')}.",
            rng.choice("ABCDE"),
        ]
    )


def synthetic_corpus(num_documents: int = 3000, seed: int = 0) -> list[str]:
    """Text in the domains lensrl trains on; the same list for the same arguments."""
    rng = random.Random(seed)
    documents = list(INSTRUCTIONS)
    for _ in range(num_documents):
        text = _problem(rng)
        if rng.random() < 0.3:
            text += "\nChoices:\n" + _choices(rng)
        if rng.random() < 0.5:
            text += " " + rng.choice(INSTRUCTIONS)
        documents.append(text)
        documents.append(_response(rng))
    return documents


def build_tokenizer(vocab_size: int = 1024, seed: int = 0) -> Tokenizer:
    """Train the byte-level BPE (`vocab_size` learned tokens) and append Qwen's special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        special_tokens=[],
    )
    tokenizer.train_from_iterator(synthetic_corpus(seed=seed), trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def train_tokenizer(out_dir: str | Path, vocab_size: int = 1024, seed: int = 0, template: str = "qwen2_5_vl") -> Path:
    """Train the tiny tokenizer and save it in Hugging Face layout under `out_dir`.

    Writes tokenizer.json, tokenizer_config.json and the chat template of `template` (a key of
    CHAT_TEMPLATES: Qwen2.5-VL's adds a default system prompt, Qwen3-VL's adds none, its thinking
    variant opens the answer with "<think>"), inside tokenizer_config.json for the tokenizer and as
    chat_template.jinja, where transformers' multimodal processors look for it. The folder loads
    with `AutoTokenizer.from_pretrained(out_dir)`. Same files for the same arguments.
    """
    chat_template = CHAT_TEMPLATES[template]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size, seed)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    added = {
        str(tokenizer.token_to_id(token)): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t != "<|endoftext|>"],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": 32768,
        "chat_template": chat_template,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "chat_template.jinja").write_text(chat_template)
    return out_dir


def special_token_ids(tokenizer_dir: str | Path) -> dict[str, int]:
    """Ids of Qwen's special tokens in a saved tokenizer.json (token -> id)."""
    tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    return {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}


@functools.cache
def tiny_special_token_ids(vocab_size: int = 1024, seed: int = 0) -> dict[str, int]:
    """Ids of Qwen's special tokens in the tokenizer `train_tokenizer` writes (trained in memory)."""
    tokenizer = build_tokenizer(vocab_size, seed)
    return {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
