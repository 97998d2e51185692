"""``megapatch demo``: patch-level training against its token-level baseline, on this machine.

Prepares the embedded corpus once (a sentencepiece tokenizer and a Megatron indexed dataset
under ``--data-dir``), then trains the same tiny GPT (examples/tiny_cpu.yaml) twice on the same
token budget with ``megapatch train``'s loop: a token-level baseline, and patch-level training
(K=4 on the first λ=2/3 of the tokens, then token level: half the compute). It prints what it
measured — compute, wall time, tokens/s per stage, final token-level validation loss and
perplexity of both — and writes RUN_DIR/val_loss.png (validation loss against tokens and FLOPs).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from megapatch.config import RunConfig, load_yaml

RECIPE = Path(__file__).resolve().parents[2] / "examples" / "tiny_cpu.yaml"


def prepare_embedded_data(data_dir: str, vocab_size: int) -> tuple[str, str]:
    """Tokenizer and indexed dataset of the embedded corpus (built once, then reused)."""
    from megapatch.data.config import PreprocessConfig, TrainTokenizerConfig
    from megapatch.data.preprocess import output_paths, preprocess
    from megapatch.data.tokenizer import train_tokenizer

    os.makedirs(data_dir, exist_ok=True)
    spm = os.path.join(data_dir, f"spm{vocab_size}")
    prefix = os.path.join(data_dir, f"embedded_spm{vocab_size}")
    if not os.path.exists(spm + ".model"):
        print(f"[demo] training a {vocab_size}-piece tokenizer on the embedded corpus")
        train_tokenizer(TrainTokenizerConfig(output_prefix=spm, vocab_size=vocab_size))
    if not all(os.path.exists(p) for p in output_paths(prefix)):
        print("[demo] tokenizing the embedded corpus into a Megatron indexed dataset")
        preprocess(PreprocessConfig(output_prefix=prefix, tokenizer_model=spm + ".model"))
    return spm + ".model", prefix


def _run_config(args: argparse.Namespace, prefix: str, name: str, fraction: float) -> RunConfig:
    import dataclasses

    cfg = load_yaml(str(RECIPE))
    cfg.run_dir = os.path.join(args.run_dir, name)
    cfg.data = dataclasses.replace(cfg.data, data_path=[prefix])
    cfg.model = dataclasses.replace(cfg.model, vocab_size=args.vocab_size)
    cfg.training = dataclasses.replace(cfg.training, train_tokens=args.train_tokens)
    cfg.stages = dataclasses.replace(cfg.stages, patch_fraction=fraction)
    cfg.checkpoint = dataclasses.replace(cfg.checkpoint, no_save=True)
    cfg.logging = dataclasses.replace(cfg.logging, plot=False)
    return cfg


def run(args: argparse.Namespace) -> int:
    """Prepare data, train both runs, print the comparison, write the plot."""
    import shutil

    import torch

    from megapatch.runtime import distributed as D
    from megapatch.training.loop import train
    from megapatch.training.metrics import plot_validation

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    _, prefix = prepare_embedded_data(args.data_dir, args.vocab_size)
    runs = {"token level only": 0.0, "patch K=4, λ=2/3": 2 / 3}
    results = {}
    for label, fraction in runs.items():
        name = "token_only" if fraction == 0 else "patch_k4"
        cfg = _run_config(args, prefix, name, fraction)
        if os.path.isdir(cfg.run_dir):
            shutil.rmtree(cfg.run_dir)  # the demo always starts afresh
        print(f"\n[demo] {label}: {cfg.run_dir}")
        results[label] = (cfg, train(cfg))
    D.destroy()

    base_flops = results["token level only"][1]["flops"]
    print(
        f"\n{'run':22} {'compute':>8} {'wall s':>7} {'patch tok/s':>11} {'token tok/s':>11} "
        f"{'val loss':>8} {'val ppl':>8}"
    )
    for label, (_, s) in results.items():
        rate = {k: s["stage_tokens"][k] / s["stage_seconds"][k] for k in s["stage_seconds"]}
        patch = f"{rate['patch']:11,.0f}" if "patch" in rate else f"{'-':>11}"
        print(
            f"{label:22} {s['flops'] / base_flops:8.3f} {s['seconds']:7.0f} {patch} "
            f"{rate['token']:11,.0f} {s['val_loss']:8.4f} {s['val_ppl']:8.2f}"
        )
    png = os.path.join(args.run_dir, "val_loss.png")
    plot_validation(
        {label: os.path.join(cfg.run_dir, "metrics.jsonl") for label, (cfg, _) in results.items()},
        png,
    )
    print(f"\nwrote {png}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``megapatch demo``."""
    p = subparsers.add_parser(
        "demo",
        help="patch-level vs token-level training on the embedded corpus (CPU, ~10 minutes)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data-dir", default="data", help="Where the prepared corpus is cached.")
    p.add_argument("--run-dir", default="runs/demo", help="Where both runs are written.")
    p.add_argument("--vocab-size", type=int, default=4000, help="Tokenizer pieces.")
    p.add_argument("--train-tokens", type=int, default=1_048_576, help="Token budget of each run.")
    p.set_defaults(func=run)
