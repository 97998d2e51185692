"""Benchmark the patch loss and PatchGPTModel; prints tables and writes JSON.

(a) Loss: megapatch's K-target vocab-parallel cross-entropy vs megatron-core's single-target
    ``vocab_parallel_cross_entropy`` on the same logits, and vs a naive K-fold loss (K calls of
    megatron's CE, each on its own copy of the logits, as its in-place fp32 path requires).
    Forward+backward time (median) and peak memory. Peak memory is measured in a fresh
    process per variant as the rise of the peak RSS over the inputs, plus the logits
    themselves ("incl. logits": what the loss needs while it runs).
(b) Model: forward+backward of PatchGPTModel at K=1 vs megatron's own GPTModel (same weights),
    and tokens/s at K=4 vs K=1 at equal tokens per step (K=4: B/K samples of K*T tokens;
    K=1: B samples of T tokens), the stage plan's shapes.

Goals (from the issue): patch loss <= 1.3x time and <= 1.1x memory of the single-target loss;
K=1 model <= 1.01x GPTModel; K=4 >= 3.6x K=1 tokens/s on CPU.

    python benchmarks/bench_model.py            # full sizes (a few minutes on 2 CPU cores)
    python benchmarks/bench_model.py --quick    # small sizes, a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LOSS_VARIANTS = ["megatron_ce_1", "patch_ce_k", "patch_ce_k_model", "naive_k_fold"]
LOSS_LABELS = {
    "megatron_ce_1": "megatron CE, 1 target",
    "patch_ce_k": "patch CE, K targets (caller keeps logits)",
    "patch_ce_k_model": "patch CE, K targets (in the model)",
    "naive_k_fold": "naive K-fold megatron CE",
}


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _loss_worker(variant: str, dtype_name: str, n: int, v: int, k: int, reps: int) -> dict:
    """Runs in its own process: first call measures memory, the rest time it."""
    from megapatch.model.patch_loss import vocab_parallel_multi_token_cross_entropy as mtce
    from megapatch.runtime import distributed as D

    D.init_process_group()
    D.initialize_model_parallel(D.ParallelLayout())
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as vpce

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(n, 1, v, generator=g) * 2).to(dtype)
    targets = torch.randint(0, v, (n, 1, k), generator=g)

    def run() -> float:
        x = base.clone().requires_grad_()
        t0 = time.perf_counter()
        if variant == "megatron_ce_1":
            loss = vpce(x, targets[..., 0]).sum()
        elif variant == "patch_ce_k":
            loss = mtce(x, targets).sum()
        elif variant == "patch_ce_k_model":
            loss = mtce(x, targets, logits_are_temporary=True).sum()
        else:
            loss = sum(vpce(x.clone(), targets[..., j]).sum() for j in range(k))
        loss.backward()
        dt = time.perf_counter() - t0
        del x, loss
        return dt

    x_warm = base.clone()  # touch one logits-sized buffer so baseline includes the clone in run()
    del x_warm
    before = _maxrss_bytes()
    first = run()
    peak_extra = max(0, _maxrss_bytes() - before)
    times = [run() for _ in range(reps)]
    return dict(
        seconds=statistics.median(times + [first]) if reps == 0 else statistics.median(times),
        peak_extra_bytes=peak_extra,
        logits_bytes=base.numel() * base.element_size(),
    )


def bench_loss(n: int, v: int, k: int, reps: int) -> list[dict]:
    rows = []
    for dtype_name in ("float32", "bfloat16"):
        for variant in LOSS_VARIANTS:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--_loss-worker",
                    variant,
                    dtype_name,
                    str(n),
                    str(v),
                    str(k),
                    str(reps),
                ],
                capture_output=True,
                text=True,
                check=True,
                env=dict(os.environ),
            )
            res = json.loads(out.stdout.strip().splitlines()[-1])
            res.update(variant=variant, dtype=dtype_name, positions=n, vocab=v, k=k)
            res["peak_bytes"] = res["peak_extra_bytes"] + res["logits_bytes"]
            rows.append(res)
        ref = next(r for r in rows if r["dtype"] == dtype_name and r["variant"] == "megatron_ce_1")
        for r in rows:
            if r["dtype"] == dtype_name:
                r["time_vs_megatron"] = r["seconds"] / ref["seconds"]
                r["memory_vs_megatron"] = r["peak_bytes"] / ref["peak_bytes"]
    return rows


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_model(quick: bool, reps: int) -> dict:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megapatch.config import ModelConfig, ParallelConfig, PrecisionConfig
    from megapatch.model import build_model, transformer_config
    from megapatch.runtime import distributed as D

    D.init_process_group()
    D.initialize_model_parallel(D.ParallelLayout())
    if quick:
        mcfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=512)
        batch, seq = 8, 64
    else:
        mcfg = ModelConfig(
            num_layers=4,
            hidden_size=256,
            num_attention_heads=4,
            vocab_size=8000,
            max_position_embeddings=1024,
        )
        batch, seq = 16, 256
    par, prec = ParallelConfig(), PrecisionConfig(transformer_impl="local")
    cfg = transformer_config(mcfg, par, prec)
    D.set_random_seeds(1)
    [patch_model] = build_model(mcfg, par, prec, patch_size=1, config=cfg)
    D.set_random_seeds(1)
    gpt = GPTModel(
        config=cfg,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization=cfg.normalization),
        vocab_size=mcfg.padded_vocab_size(1),
        max_sequence_length=mcfg.max_position_embeddings,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )
    vocab = mcfg.vocab_size
    g = torch.Generator().manual_seed(0)

    def sample(b: int, n: int, k: int) -> tuple:
        x = torch.randint(0, vocab, (b, n + k), generator=g)
        return x[:, :n], x[:, k:]

    def step(model, tokens, labels) -> None:
        model.zero_grad(set_to_none=True)
        model(tokens, None, None, labels=labels).mean().backward()

    tok1, lab1 = sample(batch, seq, 1)
    # K=1 vs GPTModel, interleaved so that machine noise hits both alike.
    t_gpt, t_k1 = [], []
    step(gpt, tok1, lab1)
    step(patch_model, tok1, lab1)
    for _ in range(reps):
        t_gpt.append(_median_time(lambda: step(gpt, tok1, lab1), 1))
        t_k1.append(_median_time(lambda: step(patch_model, tok1, lab1), 1))
    k = 4
    tok4, lab4 = sample(batch // k, seq * k, k)
    patch_model.set_patch_size(4)
    t_k4 = [_median_time(lambda: step(patch_model, tok4, lab4), 1) for _ in range(reps)]
    patch_model.set_patch_size(1)
    tokens_per_step = batch * seq
    res = dict(
        model=dict(layers=mcfg.num_layers, hidden=mcfg.hidden_size, vocab=vocab),
        tokens_per_step=tokens_per_step,
        gpt_seconds=statistics.median(t_gpt),
        k1_seconds=statistics.median(t_k1),
        k4_seconds=statistics.median(t_k4),
    )
    res["k1_vs_gpt"] = res["k1_seconds"] / res["gpt_seconds"]
    res["k1_tokens_per_s"] = tokens_per_step / res["k1_seconds"]
    res["k4_tokens_per_s"] = tokens_per_step / res["k4_seconds"]
    res["k4_vs_k1_tokens_per_s"] = res["k4_tokens_per_s"] / res["k1_tokens_per_s"]
    return res


def _fmt_mb(b: float) -> str:
    return f"{b / 2**20:8.1f}"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--_loss-worker":
        variant, dtype_name, n, v, k, reps = sys.argv[2:8]
        torch.set_num_threads(2)
        print(json.dumps(_loss_worker(variant, dtype_name, int(n), int(v), int(k), int(reps))))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="Small sizes: a smoke run in seconds.")
    p.add_argument("--reps", type=int, default=5, help="Timed repetitions per measurement.")
    p.add_argument("--patch-size", type=int, default=4, help="K for the loss benchmark.")
    p.add_argument(
        "--only", choices=["loss", "model"], default=None, help="Run one part of the benchmark."
    )
    p.add_argument(
        "--out", default=str(ROOT / "benchmarks/results/bench_model.json"), help="JSON output."
    )
    args = p.parse_args()
    torch.set_num_threads(2)
    n, v = (256, 2048) if args.quick else (2048, 32000)
    loss_rows = bench_loss(n, v, args.patch_size, args.reps) if args.only != "model" else []
    model = bench_model(args.quick, args.reps) if args.only != "loss" else None

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(loss=loss_rows, model=model, quick=args.quick), indent=2))
    if loss_rows:
        print(f"\n(a) loss forward+backward, {n} positions x vocab {v}, K={args.patch_size}")
        print(f"{'dtype':9} {'variant':44} {'ms':>8} {'x time':>7} {'peak MiB':>9} {'x mem':>6}")
    for r in loss_rows:
        print(
            f"{r['dtype']:9} {LOSS_LABELS[r['variant']]:44} {r['seconds'] * 1e3:8.1f} "
            f"{r['time_vs_megatron']:7.2f} {_fmt_mb(r['peak_bytes'])} "
            f"{r['memory_vs_megatron']:6.2f}"
        )
    if model is None:
        print(f"\nwrote {out}")
        return 0
    print(f"\n(b) model forward+backward, {model['model']}, {model['tokens_per_step']} tokens/step")
    print(f"{'model':32} {'s/step':>8} {'tokens/s':>10} {'ratio':>7}")
    print(
        f"{'megatron GPTModel':32} {model['gpt_seconds']:8.3f} "
        f"{model['tokens_per_step'] / model['gpt_seconds']:10.0f} {1.0:7.3f}"
    )
    print(
        f"{'PatchGPTModel K=1':32} {model['k1_seconds']:8.3f} "
        f"{model['k1_tokens_per_s']:10.0f} {model['k1_vs_gpt']:7.3f}  (vs GPTModel)"
    )
    print(
        f"{'PatchGPTModel K=4 (B/4 x 4T)':32} {model['k4_seconds']:8.3f} "
        f"{model['k4_tokens_per_s']:10.0f} {model['k4_vs_k1_tokens_per_s']:7.2f}  (vs K=1)"
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
