"""Benchmark the two-stage run: patch-stage vs token-stage tokens/s in ONE run of the demo model,
and the FLOP function against a hand count (torch's FlopCounterMode over the same model's
forward+backward at each stage's shape). Prints a table and writes JSON.

Goal (issue): patch-stage tokens/s >= 3.6x token-stage tokens/s at K=4 on CPU.

    python benchmarks/bench_train.py                 # ~3 minutes on 2 CPU cores
    python benchmarks/bench_train.py --train-tokens 131072
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def flop_check(cfg, plan) -> list[dict]:  # noqa: ANN001
    """flops_per_step vs FlopCounterMode for one micro-batch of each stage's shape."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from megapatch.model import build_model
    from megapatch.training.flops import flops_per_step

    [model] = build_model(cfg.model, cfg.parallel, cfg.precision, init_seed=0)
    vocab = cfg.model.padded_vocab_size(1)
    rows = []
    for s in plan:
        model.set_patch_size(s.patch_size)
        b = s.micro_batch_size
        x = torch.randint(0, cfg.model.vocab_size, (b, s.tokens_per_sample + s.patch_size))
        tokens, labels = x[:, : s.tokens_per_sample], x[:, s.patch_size :]
        with FlopCounterMode(display=False) as counter:
            model(tokens, None, None, labels=labels).sum().backward()
        counted = counter.get_total_flops()
        formula = flops_per_step(cfg.model, b, s.positions, vocab)
        m = cfg.model
        masked_half = 12 * b * s.positions * m.num_layers * m.hidden_size * s.positions / 2
        rows.append(
            dict(
                stage=s.name,
                counted=counted,
                formula=formula,
                formula_full_attention=formula + masked_half,
                ratio=counted / (formula + masked_half),
            )
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--train-tokens", type=int, default=262_144, help="Token budget of the run.")
    p.add_argument("--data-dir", default="data", help="Prepared embedded corpus (built once).")
    p.add_argument(
        "--out", default=str(ROOT / "benchmarks/results/bench_train.json"), help="JSON output."
    )
    args = p.parse_args()
    from megapatch.commands.demo import RECIPE, prepare_embedded_data
    from megapatch.config import load_yaml
    from megapatch.training.loop import train
    from megapatch.training.metrics import read_records
    from megapatch.training.plan import make_plan

    _, prefix = prepare_embedded_data(args.data_dir, 4000)
    cfg = load_yaml(str(RECIPE))
    run_dir = tempfile.mkdtemp(prefix="bench_train_")
    cfg.run_dir = run_dir
    cfg.data = dataclasses.replace(cfg.data, data_path=[prefix])
    cfg.training = dataclasses.replace(
        cfg.training, train_tokens=args.train_tokens, eval_interval=10**9, log_interval=10**9
    )
    cfg.checkpoint = dataclasses.replace(cfg.checkpoint, no_save=True)
    cfg.logging = dataclasses.replace(cfg.logging, plot=False, tensorboard=False)
    summary = train(cfg)
    recs = read_records(os.path.join(run_dir, "metrics.jsonl"), "train")
    rates = {}
    for stage in ("patch", "token"):
        steps = [r for r in recs if r["stage"] == stage][3:]  # skip warm-up steps
        rates[stage] = dict(
            steps=len(steps),
            tokens_per_s=statistics.median(r["tokens_per_s"] for r in steps),
            positions_per_s=statistics.median(r["positions_per_s"] for r in steps),
            tflops=statistics.median(r["tflops_per_gpu"] for r in steps),
        )
    ratio = rates["patch"]["tokens_per_s"] / rates["token"]["tokens_per_s"]
    flops = flop_check(cfg, make_plan(cfg, 1))

    print(f"\none run of {summary['tokens']:,} tokens on the demo model (examples/tiny_cpu.yaml)")
    print(f"{'stage':6} {'steps':>6} {'tokens/s':>10} {'positions/s':>12} {'TFLOP/s':>8}")
    for stage, r in rates.items():
        print(
            f"{stage:6} {r['steps']:6d} {r['tokens_per_s']:10,.0f} "
            f"{r['positions_per_s']:12,.0f} {r['tflops']:8.4f}"
        )
    print(f"patch / token tokens/s: {ratio:.2f}x (goal >= 3.6x at K=4)")
    print(f"\n{'stage':6} {'FlopCounterMode':>16} {'formula+masked half':>20} {'ratio':>8}")
    for r in flops:
        print(
            f"{r['stage']:6} {r['counted']:16,.0f} {r['formula_full_attention']:20,.0f} "
            f"{r['ratio']:8.6f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(rates=rates, ratio=ratio, flops=flops), indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
