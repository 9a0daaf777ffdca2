"""A trainer run for the multi-process tests, launched as `torchrun ... dist_run_trainer.py grpo|sft KEY=VALUE...`
or plain `python dist_run_trainer.py ...` (one process).

GRPO scores completions with a reward that a random tiny model earns some of the time (the share
of letters among the completion's characters), so every step has a learning signal.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lensrl.config import GRPOConfig, SFTConfig, load_config  # noqa: E402
from lensrl.rewards.pool import RewardResult  # noqa: E402
from lensrl.trainers.grpo import GRPOTrainer  # noqa: E402
from lensrl.trainers.sft import SFTTrainer  # noqa: E402


class LetterShareGRPO(GRPOTrainer):
    def score(self, samples, flat):
        out = []
        for _, completion in flat:
            text = completion.text
            share = sum(ch.isalpha() for ch in text) / max(len(text), 1)
            out.append(RewardResult(share, {"accuracy": share}, "ok"))
        return out


if __name__ == "__main__":
    from lensrl.train.distributed import shutdown

    command, overrides = sys.argv[1], sys.argv[2:]
    if command == "grpo":
        LetterShareGRPO(load_config(GRPOConfig, None, overrides)).fit()
    else:
        SFTTrainer(load_config(SFTConfig, None, overrides)).fit()
    shutdown()
