"""lensrl: post-train vision-language models with SFT and GRPO."""

__version__ = "0.1.0"
