#!/usr/bin/env python
"""Data pipeline throughput: preprocessing tokens/s per worker and sample loading tokens/s.

Uses the embedded corpus (also reports its size: documents, characters, tokens). Preprocessing
is timed on a JSONL copy of the corpus repeated ``--repeat`` times (so reading Python's source
files does not dominate). Loading is timed through a torch DataLoader over the patch stage's
dataset, as the training loop uses it, in input tokens (K*T per sample) per second after the
first batch; start-up is reported separately. The target is loading >= 20x the patch stage's
consumption, taken as the ASSUMED figure of ~20k tokens/s for the CPU demo (not measured here).

    python benchmarks/bench_data.py            # prints a table, writes benchmarks/results/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from megapatch.data.config import DataConfig, PreprocessConfig, TrainTokenizerConfig  # noqa: E402
from megapatch.data.corpus import iter_documents, resolve_sources  # noqa: E402
from megapatch.data.preprocess import preprocess  # noqa: E402
from megapatch.data.tokenizer import train_tokenizer  # noqa: E402

ASSUMED_PATCH_STAGE_TOKENS_PER_S = 20_000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--repeat", type=int, default=4, help="corpus copies timed in preprocessing")
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=256, help="T (patches per patch sample)")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=300, help="micro batches timed per loader")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()
    quiet = lambda msg: None  # noqa: E731
    rows: list[tuple[str, str]] = []
    result: dict = {"python": platform.python_version(), "cpus": os.cpu_count()}

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        docs = [d.text for d in iter_documents(resolve_sources(["embedded"]))]
        read_s = time.perf_counter() - t0
        tok = train_tokenizer(
            TrainTokenizerConfig(output_prefix=f"{tmp}/spm", vocab_size=args.vocab_size), quiet
        )
        stats = preprocess(
            PreprocessConfig(output_prefix=f"{tmp}/embedded", tokenizer_model=tok.model_path),
            quiet,
        )
        result["embedded_corpus"] = {
            "documents": stats.documents,
            "characters": stats.characters,
            "tokens_with_eod": stats.tokens,
            "vocab_size": args.vocab_size,
            "read_seconds": round(read_s, 2),
        }
        rows.append(
            (
                "embedded corpus",
                f"{stats.documents} docs, {stats.characters:,} chars, {stats.tokens:,} tokens "
                f"({args.vocab_size}-piece BPE, EOD included)",
            )
        )

        with open(f"{tmp}/corpus.jsonl", "w") as f:
            for _ in range(args.repeat):
                f.writelines(json.dumps({"text": t}) + "\n" for t in docs)
        result["preprocess"] = {}
        for workers in (1, 2):
            cfg = PreprocessConfig(
                input=[f"{tmp}/corpus.jsonl"],
                output_prefix=f"{tmp}/w{workers}",
                tokenizer_model=tok.model_path,
                workers=workers,
            )
            s = preprocess(cfg, quiet)
            rate = s.tokens_per_second
            result["preprocess"][workers] = {"tokens": s.tokens, "tokens_per_s": round(rate)}
            rows.append(
                (
                    f"preprocess, {workers} worker(s)",
                    f"{rate:,.0f} tokens/s total, {rate / workers:,.0f} per worker",
                )
            )

        from megapatch.data.datasets import build_stage_datasets
        from megapatch.data.sampler import build_data_loader
        from megapatch.data.stages import stage_specs_from_budget

        k, t, mbs = args.patch_size, args.seq_length, args.micro_batch_size
        budget = 3 * args.batches * mbs * k * t  # the patch stage (2/3) holds > args.batches
        stages = stage_specs_from_budget(budget, 2 / 3, k, t, mbs * k)
        config = DataConfig(data_path=[f"{tmp}/w1"], seq_length=t, split="98,2,0")
        t0 = time.perf_counter()
        built = build_stage_datasets(config, stages, valid_samples=64)
        result["build_seconds"] = round(time.perf_counter() - t0, 3)
        dataset = built.train[0]
        rows.append(("stage datasets built", f"{result['build_seconds']:.2f}s (index cache cold)"))

        t0 = time.perf_counter()
        n = min(len(dataset), args.batches * mbs)
        for i in range(n):
            dataset[i]
        direct = n * k * t / (time.perf_counter() - t0)
        result["loading"] = {"dataset_getitem_tokens_per_s": round(direct)}
        rows.append(("dataset[i], no DataLoader", f"{direct:,.0f} tokens/s"))
        for workers in (0, 1, 2):
            loader = build_data_loader(dataset, 0, mbs, num_workers=workers)
            t0 = time.perf_counter()
            it = iter(loader)
            next(it)
            startup = time.perf_counter() - t0
            t0, count = time.perf_counter(), 0
            for _, batch in zip(range(args.batches - 1), it):
                count += batch["tokens"].numel()
            rate = count / (time.perf_counter() - t0)
            ratio = rate / ASSUMED_PATCH_STAGE_TOKENS_PER_S
            result["loading"][f"dataloader_{workers}_workers"] = {
                "tokens_per_s": round(rate),
                "startup_s": round(startup, 3),
                "ratio_to_assumed_20k": round(ratio, 1),
            }
            rows.append(
                (
                    f"DataLoader, {workers} worker(s), mbs {mbs} x {k * t} tokens",
                    f"{rate:,.0f} tokens/s = {ratio:,.0f}x the assumed 20k tokens/s "
                    f"(first batch after {startup:.2f}s)",
                )
            )
            del it, loader

    result["config"] = {"patch_size": k, "seq_length": t, "micro_batch_size": mbs}
    result["assumed_patch_stage_tokens_per_s"] = ASSUMED_PATCH_STAGE_TOKENS_PER_S
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}} | result")
    print("-" * width + "-+-" + "-" * 60)
    for name, value in rows:
        print(f"{name:<{width}} | {value}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_data.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {path}; the 20k tokens/s patch-stage figure is assumed, not measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
