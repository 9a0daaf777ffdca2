"""`lensrl` command line: one entry point for every job.

    lensrl demo                                   tiny model + synthetic data: SFT, then GRPO, offline
    lensrl grpo --config FILE [key=value ...]     GRPO (and relatives) of a Qwen-VL policy
    lensrl sft  --config FILE [key=value ...]     supervised fine-tuning
    lensrl eval --model DIR --data DIR [key=value ...]
    lensrl data geo3k|robo2vlm|synth ...          datasets into lensrl's parquet layout
    lensrl model tiny --arch qwen2_5_vl --out DIR a random-init tiny Qwen-VL folder
    lensrl convert --ckpt RUN/checkpoints/step_N --out DIR [--base MODEL] [--dtype bfloat16]
                   [--expert-layout per_expert] [--lora-format peft]
                                                  a training checkpoint to a Hugging Face folder
    lensrl config show grpo|sft|eval              the defaults of a command
    lensrl report RUN [RUN ...] [--out DIR]       plots and an HTML page of run folders (several: overlaid)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML recipe (e.g. configs/qwen2_5_vl_3b_geo3k_grpo.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. actor.optim.lr=2e-6")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lensrl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="offline end-to-end demo: tiny model, synthetic data, SFT then GRPO")
    demo.add_argument("--out", default="runs/demo", help="folder for the demo's model, data and runs")
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument("--quick", action="store_true", help="a smaller, faster run (used by the tests)")

    _add_config_args(sub.add_parser("grpo", help="GRPO / Dr.GRPO / RLOO / REINFORCE++ training"))
    _add_config_args(sub.add_parser("sft", help="supervised fine-tuning"))
    ev = sub.add_parser("eval", help="accuracy of a model folder on a dataset")
    ev.add_argument("--model", help="HF model folder (sets model.path)")
    ev.add_argument("--data", help="parquet file or a folder with test.parquet (sets data.val_files)")
    _add_config_args(ev)

    data = sub.add_parser("data", help="make or convert datasets").add_subparsers(dest="data_command", required=True)
    g = data.add_parser("geo3k", help="geometry3k (hub or RLinf layout) -> lensrl train/test parquet")
    g.add_argument("--src", required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--instruction", default=None,
                   help="text appended to each problem; 'r1' for the verl/EasyR1 <think>/\\boxed{} instruction")
    r = data.add_parser("robo2vlm", help="Robo2VLM-1 shards (mixed train/test) -> train/test parquet")
    r.add_argument("--src", required=True)
    r.add_argument("--out", required=True)
    s = data.add_parser("synth", help="procedurally rendered geometry problems")
    s.add_argument("--task", required=True)
    s.add_argument("--n", type=int, default=1000, help="training rows")
    s.add_argument("--n-test", type=int, default=None, help="test rows (default: a fifth of --n)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.add_argument("--format", choices=["geo3k", "choice"], default="geo3k")
    s.add_argument("--image-size", type=int, default=None)

    model = sub.add_parser("model", help="model folders").add_subparsers(dest="model_command", required=True)
    t = model.add_parser("tiny", help="write a random-init tiny Qwen-VL model folder")
    t.add_argument("--arch", choices=["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"], default="qwen2_5_vl")
    t.add_argument("--preset", default="5m")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--force", action="store_true", help="replace a folder that is not empty")

    conv = sub.add_parser("convert", help="a training checkpoint (RUN/checkpoints/step_N) to a Hugging Face folder")
    conv.add_argument("--ckpt", required=True, help="checkpoint folder, e.g. runs/NAME/checkpoints/step_100")
    conv.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    conv.add_argument("--base", default=None,
                      help="model folder or shape name the run started from (default: model.path of RUN/config.yaml)")
    conv.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                      help="cast floating-point weights (default: as stored in the checkpoint)")
    conv.add_argument("--max-shard-size", default="5GiB",
                      help="largest safetensors file, e.g. 5GB (10^9 bytes), 4GiB (2^30) or bytes (default 5GiB)")
    conv.add_argument("--expert-layout", choices=["stacked", "per_expert"], default="stacked",
                      help="mixture-of-experts weights: 'stacked' (default) as save_pretrained writes them, one "
                           "gate_up_proj and down_proj per layer; 'per_expert' as experts.{i}.gate_proj/up_proj/"
                           "down_proj.weight for loaders that expect that layout (the seed converter's --groupgemm); "
                           "a model without experts refuses per_expert")
    conv.add_argument("--lora-format", choices=["merged", "peft"], default="merged",
                      help="a LoRA checkpoint (adapters only): 'merged' (default) the base model's weights with the "
                           "adapters merged in, a folder plain transformers loads; 'peft' adapter_config.json + "
                           "adapter_model.safetensors for PeftModel.from_pretrained(<base model>, DIR); a "
                           "full-parameter checkpoint refuses peft")
    conv.add_argument("--no-progress", action="store_true", help="no progress bar")

    cfg = sub.add_parser("config", help="configuration").add_subparsers(dest="config_command", required=True)
    show = cfg.add_parser("show", help="print a command's defaults (or a resolved recipe) as YAML")
    show.add_argument("name", choices=["grpo", "sft", "eval"])
    _add_config_args(show)

    rep = sub.add_parser("report", help="PNG plots and one HTML page of run folders (several: overlaid)")
    rep.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s) holding metrics.jsonl, e.g. runs/NAME")
    rep.add_argument("--out", default=None, help="report folder (default RUN/report for one run; required for several)")
    rep.add_argument("--samples", type=_non_negative, default=4, help="completions shown per samples file (default 4)")
    return parser


def main(argv: list[str] | None = None) -> None:
    # Packed micro-batches change length every step; without expandable segments the CUDA
    # caching allocator fragments (benchmarks/RESULTS.md: the compiled 3B training step ran at
    # 43.8% MFU without them, 48.0% with). Before anything touches CUDA; a user's setting wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from lensrl.config import ConfigError
    from lensrl.data.sample import DataError
    from lensrl.models.errors import ModelError
    from lensrl.report import ReportError
    from lensrl.rewards.function import RewardFunctionError
    from lensrl.train.checkpoint import CheckpointError
    from lensrl.train.convert import ConvertError
    from lensrl.train.heartbeat import RankHungError
    from lensrl.trainers.errors import BadStepsError

    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # lensrl prints its own progress
    from lensrl.train.distributed import shutdown

    try:
        _dispatch(args)
    except (ConfigError, DataError, ModelError, ConvertError, RewardFunctionError, CheckpointError, ReportError,
            FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (BadStepsError, RankHungError) as e:  # the run itself failed; its last good checkpoint is named
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted (no checkpoint of the step in flight)", file=sys.stderr)
        sys.exit(130)
    shutdown()  # after a run that succeeded (a failing one exits without waiting on its peers)


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _dispatch(args: argparse.Namespace) -> None:
    if args.command == "demo":
        from lensrl.demo import run_demo

        run_demo(out=args.out, seed=args.seed, quick=args.quick)
    elif args.command == "grpo":
        from lensrl.trainers.grpo import run_grpo

        run_grpo(args.config, args.overrides)
    elif args.command == "sft":
        from lensrl.trainers.sft import run_sft

        run_sft(args.config, args.overrides)
    elif args.command == "eval":
        from lensrl.trainers.evaluate import run_eval

        overrides = list(args.overrides)
        if args.model:
            overrides.append(f"model.path={args.model}")
        if args.data:
            data = Path(args.data)
            files = [str(data / "test.parquet")] if (data / "test.parquet").is_file() else [str(data)]
            overrides.append(f"data.val_files=[{','.join(files)}]")
        run_eval(args.config, overrides)
    elif args.command == "data":
        _data(args)
    elif args.command == "model":
        from lensrl.models.errors import ModelError
        from lensrl.models.tiny import PRESETS, make_tiny_model

        if args.preset not in PRESETS:
            raise ModelError(f"--preset {args.preset!r} is not a tiny preset; presets: {', '.join(PRESETS)}")
        out = Path(args.out)
        if out.is_dir() and any(out.iterdir()):  # e.g. a run's hf/: eval would grade random weights as that run
            if not args.force:
                run = " (a trained model of a lensrl run)" if (out / "lensrl_run.yaml").exists() else ""
                raise ModelError(f"--out {out} is not empty{run}; choose a new folder, or --force to replace it")
            shutil.rmtree(out)
        path = make_tiny_model(out, arch=args.arch, preset=args.preset, seed=args.seed)
        print(f"wrote {path}")
    elif args.command == "convert":
        from lensrl.train.convert import convert_checkpoint, parse_size

        path = convert_checkpoint(args.ckpt, args.out, base=args.base, dtype=args.dtype,
                                  max_shard_size_bytes=parse_size(args.max_shard_size), progress=not args.no_progress,
                                  expert_layout=args.expert_layout, lora_format=args.lora_format)
        print(f"wrote {path}")
        if args.expert_layout == "per_expert":  # config.json is the same as stacked: say what the folder is for
            print("per-expert layout (experts.{i}.gate_proj/up_proj/down_proj) for loaders that expect it; "
                  "transformers 5 and lensrl read the stacked layout (--expert-layout stacked)")
    elif args.command == "config":
        from lensrl.config import COMMAND_CONFIGS, load_config, to_yaml

        print(to_yaml(load_config(COMMAND_CONFIGS[args.name], args.config, args.overrides, check_rules=False)), end="")
    elif args.command == "report":
        from lensrl.report import write_report

        report = write_report(args.runs, args.out, max_samples=args.samples)
        empty = f"; no data for: {', '.join(report.empty_topics)}" if report.empty_topics else ""
        print(f"wrote {report.html} ({len(report.figures)} figures{empty})")


def _data(args: argparse.Namespace) -> None:
    if args.data_command == "geo3k":
        from lensrl.data.geo3k import R1_INSTRUCTION, convert_geo3k

        instruction = R1_INSTRUCTION if args.instruction == "r1" else args.instruction
        counts = convert_geo3k(args.src, args.out, instruction=instruction)
    elif args.data_command == "robo2vlm":
        from lensrl.data.robo2vlm import convert_robo2vlm

        counts = convert_robo2vlm(args.src, args.out)
    else:
        from lensrl.data.synth import make_synth

        kwargs = {"image_size": args.image_size} if args.image_size else {}
        counts = make_synth(args.task, args.n, args.seed, args.out, n_test=args.n_test, fmt=args.format, **kwargs)
    print(f"wrote {args.out}: {counts}")


if __name__ == "__main__":
    main()
