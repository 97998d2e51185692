"""Memory estimate (megapatch/planning/memory.py) against what a real PatchGPTModel holds on CPU,
and against Megatron-LM's theoretical-memory formula for the shipped recipes.

Prints two tables and writes benchmarks/results/memory.json:

1. measured vs estimated bytes per region (input, transformer layers, output + loss) of one
   micro-batch and the model state after one real step, for a small Llama-style model at
   K=1 and K=4, fp32 and bf16 (megatron-core's local layers: what runs on CPU);
2. weight + optimizer memory and activations per GPU of the recipes, ours vs the formula of
   Megatron-LM's theoretical_memory_usage.py (activations under its assumptions: GELU, MHA,
   dropout, LayerNorm, selective recompute).

    .venv/bin/python benchmarks/bench_memory.py
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    import dataclasses

    from megapatch.config import ParallelConfig
    from megapatch.runtime import distributed as D
    from tests.training.test_estimate_measured import _estimate, _measure, _model, _model_state
    from tests.training.test_estimate_megatron import (
        CASES,
        _cfg,
        _stage,
        megatron_activations,
        megatron_weight_and_optimizer,
    )

    t0 = time.perf_counter()
    D.init_process_group()
    rows = []
    print(f"{'model':12} {'dtype':5} {'K':>2} {'region':14} {'measured':>12} {'estimated':>12}")
    for swiglu in (True, False):
        for bf16 in (False, True):
            for k in (1, 4):
                model = _model(swiglu)
                meas = _measure(model, ParallelConfig(), bf16, k)
                est = _estimate(model, ParallelConfig(), bf16, k)
                meas = {
                    "embedding": meas["embedding"],
                    "layers": meas["layers"],
                    "output": meas["output"] + meas["loss"],
                }
                for region in ("embedding", "layers", "output"):
                    name = "gqa-swiglu" if swiglu else "mha-gelu"
                    dtype = "bf16" if bf16 else "fp32"
                    rows.append(
                        dict(model=name, dtype=dtype, K=k, region=region,
                             measured=meas[region], estimated=est[region])
                    )  # fmt: skip
                    print(
                        f"{name:12} {dtype:5} {k:2d} {region:14} {meas[region]:12,d} "
                        f"{est[region]:12,.0f}"
                    )
    state = []
    for bf16 in (False, True):
        out = _model_state(ParallelConfig(), bf16, distributed_optimizer=False)
        for key, value in out["measured"].items():
            state.append(dict(dtype="bf16" if bf16 else "fp32", term=key, measured=value,
                              estimated=out["estimated"][key]))  # fmt: skip
            print(f"{'model state':12} {state[-1]['dtype']:5} {'':2} {key:14} {value:12,d} "
                  f"{out['estimated'][key]:12,.0f}")  # fmt: skip
    print()
    print(f"{'recipe':11} {'layout':34} {'w+opt ours':>11} {'Megatron':>9} {'act ours':>9} "
          f"{'Megatron':>9}  (GiB per GPU)")  # fmt: skip
    recipes = []
    for recipe, par, world in CASES:
        cfg = _cfg(recipe, **dict(par))
        dp = cfg.parallel.data_parallel_size(world)
        first = _stage(cfg, world, cfg.data.seq_length, 1, 8).ranks[0]
        ours = first.state["weights"] + first.state["gradients"] + first.state["optimizer"]
        ref = megatron_weight_and_optimizer(cfg, dp)
        h = cfg.model.hidden_size
        cfg.model = dataclasses.replace(
            cfg.model, swiglu=False, ffn_hidden_size=4 * h, num_query_groups=None,
            hidden_dropout=0.1, attention_dropout=0.1, normalization="LayerNorm",
        )  # fmt: skip
        cfg.precision = dataclasses.replace(cfg.precision, fp8_format=None)
        cfg.training.recompute_granularity = "selective"
        tp = cfg.parallel.tensor_model_parallel_size
        cfg.parallel = dataclasses.replace(cfg.parallel, sequence_parallel=tp > 1)
        act = _stage(cfg, world, cfg.data.seq_length, 1, 8).ranks[0].activations_in_flight
        act_ref = megatron_activations(cfg, cfg.data.seq_length, 1, 8)
        layout = ", ".join(f"{k}={v}" for k, v in par.items()) or "as in the recipe"
        recipes.append(dict(recipe=recipe, layout=layout, world=world,
                            weight_optimizer=ours, weight_optimizer_megatron=ref,
                            activations=act, activations_megatron=act_ref))  # fmt: skip
        g = 2**30
        print(f"{recipe:11} {layout[:34]:34} {ours / g:11.3f} {ref / g:9.3f} {act / g:9.3f} "
              f"{act_ref / g:9.3f}")  # fmt: skip
    worst = max(
        max(abs(r["weight_optimizer"] / r["weight_optimizer_megatron"] - 1),
            abs(r["activations"] / r["activations_megatron"] - 1))
        for r in recipes
    )  # fmt: skip
    print(f"\nlargest difference from Megatron-LM's formula: {worst:.3%} (goal: within 5%)")
    out = dict(activations=rows, model_state=state, recipes=recipes,
               largest_relative_difference=worst, seconds=time.perf_counter() - t0)  # fmt: skip
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    path = os.path.join(os.path.dirname(__file__), "results", "memory.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {path}")
    D.destroy()


if __name__ == "__main__":
    main()
