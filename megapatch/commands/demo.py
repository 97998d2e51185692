"""``megapatch demo``: patch-level vs token-level training steps on real text, on this machine.

Prepares the embedded corpus once (a sentencepiece tokenizer and a Megatron indexed dataset
under ``--data-dir``), then trains the same tiny GPT from the same initialisation twice for a
few steps at equal tokens per step: once at token level (K=1) and once at patch level (K=4,
B/K samples of K*T tokens), and reports tokens/s and the token-level validation loss of both.
"""

from __future__ import annotations

import argparse
import os
import time

from megapatch.config import ModelConfig, ParallelConfig, PrecisionConfig


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


def run(args: argparse.Namespace) -> int:
    """Build data, then train and evaluate the two variants; print the table."""
    import torch

    from megapatch.data.config import DataConfig
    from megapatch.data.datasets import build_stage_datasets
    from megapatch.data.stages import StageSpec
    from megapatch.data.tokenizer import Tokenizer
    from megapatch.model import build_model
    from megapatch.runtime import distributed as D

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    spm, prefix = prepare_embedded_data(args.data_dir, args.vocab_size)
    tok = Tokenizer(spm)
    k, t, b = 4, args.seq_length, args.global_batch_size
    stages = [StageSpec(k, k * t, args.steps * b // k), StageSpec(1, t, args.steps * b)]
    data = build_stage_datasets(
        DataConfig(data_path=[prefix], seq_length=t, tokenizer_model=spm, num_workers=0),
        stages,
        valid_samples=args.valid_samples,
    )
    D.init_process_group()
    D.initialize_model_parallel(D.ParallelLayout())
    model_cfg = ModelConfig(
        num_layers=4, hidden_size=128, num_attention_heads=4, vocab_size=tok.vocab_size
    )

    def batches(ds, size):  # noqa: ANN001, ANN202
        for i in range(0, len(ds), size):
            items = [ds[j] for j in range(i, min(i + size, len(ds)))]
            yield {key: torch.stack([it[key] for it in items]) for key in items[0]}

    def valid_loss(model) -> float:  # noqa: ANN001
        model.eval()
        total = count = 0.0
        with torch.no_grad():
            for batch in batches(data.valid, 16):
                loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
                total += float((loss * batch["loss_mask"]).sum())
                count += float(batch["loss_mask"].sum())
        model.train()
        return total / count

    rows = []
    for name, patch, ds, per_step in (
        ("token level (K=1)", 1, data.train[1], b),
        ("patch level (K=4)", k, data.train[0], b // k),
    ):
        D.set_random_seeds(1234)
        [model] = build_model(
            model_cfg, ParallelConfig(), PrecisionConfig(transformer_impl="local"), patch_size=patch
        )
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95))
        tokens, start, losses = 0, time.perf_counter(), []
        for batch in batches(ds, per_step):
            per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            mask = batch["loss_mask"]
            loss = (per_token * mask).sum() / mask.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            tokens += batch["tokens"].numel()
        elapsed = time.perf_counter() - start
        model.set_patch_size(1)  # validation is always token level
        rows.append(
            (name, len(losses), tokens, tokens / elapsed, losses[0], losses[-1], valid_loss(model))
        )
    print(
        f"\n{'run':20} {'steps':>5} {'tokens':>8} {'tokens/s':>9} {'first loss':>10} "
        f"{'last loss':>9} {'valid loss (token level)':>25}"
    )
    for r in rows:
        print(f"{r[0]:20} {r[1]:5d} {r[2]:8d} {r[3]:9.0f} {r[4]:10.3f} {r[5]:9.3f} {r[6]:25.3f}")
    print(f"\npatch level processed tokens {rows[1][3] / rows[0][3]:.2f}x faster than token level")
    D.destroy()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``megapatch demo``."""
    p = subparsers.add_parser(
        "demo",
        help="patch vs token level training steps on the embedded corpus (CPU, minutes)",
        description=__doc__,
    )
    p.add_argument("--data-dir", default="data", help="Where the prepared corpus is cached.")
    p.add_argument("--vocab-size", type=int, default=4000, help="Tokenizer pieces.")
    p.add_argument("--seq-length", type=int, default=128, help="T: tokens per token-level sample.")
    p.add_argument("--global-batch-size", type=int, default=16, help="B at token level.")
    p.add_argument("--steps", type=int, default=20, help="Optimizer steps per variant.")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate.")
    p.add_argument("--valid-samples", type=int, default=64, help="Validation samples.")
    p.set_defaults(func=run)
