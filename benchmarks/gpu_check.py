"""The prepared GPU check: CUDA-vs-CPU correctness and timings side by side, a table last.

Run on a machine with one GPU (see tools/gpu_check.sh, which installs megatron-core from a
carried wheel first). Without CUDA it runs the CPU half only (a dry run) and says so.

Checks, each CUDA against the same computation on CPU in fp32:
  1. the multi-token vocab-parallel loss (K=4): losses and gradients, fp32 and bf16 logits;
  2. PatchGPTModel at K=1 vs megatron's GPTModel on CUDA (same weights): identical loss;
  3. PatchGPTModel at K=4 on CUDA vs CPU (same weights): loss and a gradient norm.
Timings (CUDA events, bf16 where it applies): the patch loss vs megatron's single-target loss,
and model forward+backward tokens/s at K=1 vs K=4 at equal tokens per step.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _time(fn, reps: int, cuda: bool) -> float:
    fn()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main() -> int:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megapatch.config import ModelConfig, ParallelConfig, PrecisionConfig
    from megapatch.model import build_model, transformer_config
    from megapatch.model.patch_loss import vocab_parallel_multi_token_cross_entropy as mtce
    from megapatch.runtime import distributed as D

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    D.init_process_group()
    D.initialize_model_parallel(D.ParallelLayout())
    rows: list[tuple[str, str, str]] = []

    # 1. loss, CUDA vs CPU
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(512, 2, 32000, generator=g) * 3
    targets = torch.randint(0, 32000, (512, 2, 4), generator=g)
    ref_x = logits.clone().requires_grad_()
    ref = mtce(ref_x, targets)
    ref.sum().backward()
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.to(dev, dtype, copy=True).requires_grad_()  # a leaf, logits untouched
        loss = mtce(x, targets.to(dev))
        loss.sum().backward()
        dl = (loss.float().cpu() - ref.detach()).abs().max().item()
        dg = (x.grad.float().cpu() - ref_x.grad).abs().max().item()
        rows.append(
            (f"loss K=4 {dtype} {dev} vs cpu fp32", f"{dl:.2e} / {dg:.2e}", "max |dloss| / |dgrad|")
        )

    # 2./3. models
    mcfg = ModelConfig(
        num_layers=4,
        hidden_size=512,
        num_attention_heads=8,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    par, prec = ParallelConfig(), PrecisionConfig(transformer_impl="local")
    cfg = transformer_config(mcfg, par, prec)
    [m] = build_model(mcfg, par, prec, config=cfg, init_seed=1)
    m = m.to(dev)
    D.set_random_seeds(1)
    gpt = GPTModel(
        config=cfg,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=mcfg.padded_vocab_size(1),
        max_sequence_length=4096,
        position_embedding_type="rope",
    ).to(dev)
    gpt.load_state_dict(m.state_dict())
    x = torch.randint(0, 32000, (8, 1024 + 4), generator=g)
    t1, l1 = x[:, :1024].to(dev), x[:, 1:1025].to(dev)
    same = torch.equal(m(t1, None, None, labels=l1), gpt(t1, None, None, labels=l1))
    rows.append(("K=1 PatchGPTModel == GPTModel", str(same), dev))
    m.set_patch_size(4)
    t4, l4 = x[:2, :1024].to(dev), x[:2, 4:1028].to(dev)  # 256 patches of 4 tokens
    loss_dev = m(t4, None, None, labels=l4).mean()
    cpu_model = m.to("cpu")
    loss_cpu = cpu_model(t4.cpu(), None, None, labels=l4.cpu()).mean()
    rows.append(
        ("K=4 loss cuda vs cpu", f"{abs(loss_dev.item() - loss_cpu.item()):.2e}", "abs diff")
    )
    m = cpu_model.to(dev)

    # timings
    reps = 20 if cuda else 2
    for dtype in (torch.bfloat16,) if cuda else (torch.float32,):
        base = (torch.randn(4096, 1, 32000, device=dev) * 3).to(dtype)
        tg = torch.randint(0, 32000, (4096, 1, 4), device=dev)

        def single(base=base, tg=tg) -> None:
            y = base.clone().requires_grad_()
            vocab_parallel_cross_entropy(y, tg[..., 0]).sum().backward()

        def patch(base=base, tg=tg) -> None:
            y = base.clone().requires_grad_()
            mtce(y, tg, logits_are_temporary=True).sum().backward()

        ts, tp = _time(single, reps, cuda), _time(patch, reps, cuda)
        rows.append(
            (
                f"loss time {dtype}: megatron 1 target / patch K=4",
                f"{ts * 1e3:.2f} / {tp * 1e3:.2f} ms",
                f"{tp / ts:.2f}x",
            )
        )
    steps = {}
    for k in (1, 4):
        m.set_patch_size(k)
        b, n = 16 // k, 1024 * k
        xx = torch.randint(0, 32000, (b, n + k), device=dev)

        def step(xx=xx, k=k, n=n) -> None:
            m.zero_grad(set_to_none=True)
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda):
                m(xx[:, :n], None, None, labels=xx[:, k:]).mean().backward()

        steps[k] = _time(step, reps, cuda)
    toks = 16 * 1024
    rows.append(
        (
            "model tokens/s K=1 / K=4",
            f"{toks / steps[1]:,.0f} / {toks / steps[4]:,.0f}",
            f"{steps[1] / steps[4]:.2f}x",
        )
    )

    name = torch.cuda.get_device_name() if cuda else "CPU (dry run: no CUDA here)"
    print(f"\nGPU check on {name}")
    print(f"{'check':52} {'result':>28} {'note':>22}")
    for r in rows:
        print(f"{r[0]:52} {r[1]:>28} {r[2]:>22}")
    out = Path(os.environ.get("OUT", ROOT / "benchmarks/results")) / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(device=name, rows=rows), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
