"""``megapatch plan``: plan a run for a GPU cluster from anywhere (no GPU, no Transformer Engine).

Takes every ``megapatch train`` flag (a YAML recipe and overrides) plus the machine: ``--nodes``,
``--gpus-per-node``, ``--gpu``, ``--gpu-memory-gib``, ``--efficiency``. Validates the run for that
many ranks (every shape of both stages; Transformer Engine/FP8, the data and --load are checked
when the run starts) and prints, per stage: the layout and pipeline bubble, a per-GPU memory
estimate term by term with the peak against the device (a warning when it does not fit), and a
projected step time, tokens/s/GPU, MFU, wall time and GPU-hours next to the token-level baseline
of the same budget, with the cost model's assumptions. ``--json PATH`` writes the same report.

    megapatch plan --config examples/llama2_7b.yaml --nodes 2 --gpus-per-node 8

``megapatch train --dry-run`` prints the same report through :func:`print_report`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from typing import Any

from megapatch.config import ConfigError, RunConfig, add_run_arguments, config_from_args
from megapatch.planning import cost as C
from megapatch.planning import memory as M
from megapatch.training.plan import StagePlan, format_plan, make_plan

GIB = M.GIB


def _check_world(cfg: RunConfig, world_size: int, hw_args: Any) -> None:
    par = cfg.parallel
    mp = par.tensor_model_parallel_size * par.pipeline_model_parallel_size
    if world_size < 1:
        raise ConfigError("--nodes x --gpus-per-node must be >= 1")
    if mp >= 1 and world_size % mp:
        nodes = C._get(hw_args, "nodes")
        per = C._get(hw_args, "gpus_per_node")
        world = f"--nodes {nodes} x --gpus-per-node {per} = " if nodes and per else ""
        raise ConfigError(
            f"{world}{world_size} GPUs are not divisible by --tensor-model-parallel-size "
            f"({par.tensor_model_parallel_size}) x --pipeline-model-parallel-size "
            f"({par.pipeline_model_parallel_size}); change the GPU count or the layout"
        )


def _memory_dict(mem: M.StageMemory, hw: C.Hardware) -> dict[str, Any]:
    r = mem.peak_rank
    device = hw.memory_gib * GIB
    layers = sum(r.layers_per_microbatch.values())
    return {
        "peak_pp_rank": r.pp_rank,
        "weights": r.state["weights"],
        "gradients": r.state["gradients"],
        "optimizer": r.state["optimizer"],
        "optimizer_without_distributed_optimizer": r.state["optimizer_unsharded"],
        "fp8_weight_copies": r.state["fp8_weight_copies"],
        "model_state": r.model_state,
        "activations_per_microbatch": r.activations_per_microbatch,
        "activations_per_microbatch_terms": {
            "layers": dict(r.layers_per_microbatch),
            "input": dict(r.embedding_per_microbatch),
            "output": dict(r.output_per_microbatch),
        },
        "activations_layers_per_microbatch": layers,
        "microbatches_in_flight": r.in_flight,
        "activations_in_flight": r.activations_in_flight,
        "transient": dict(r.transient),
        "reserve": r.reserve,
        "peak": r.peak,
        "device": device,
        "fits": r.peak <= device,
        "peak_per_pp_rank": [x.peak for x in mem.ranks],
        "unit": "bytes",
    }


def build_report(cfg: RunConfig, world_size: int, hardware_args: Any = None) -> dict[str, Any]:
    """The plan of ``cfg`` on ``world_size`` GPUs as a JSON-able dict (raises ConfigError)."""
    return _build(cfg, world_size, hardware_args)[0]


def _build(
    cfg: RunConfig, world_size: int, hardware_args: Any
) -> tuple[dict[str, Any], list[StagePlan]]:
    from megapatch.training.validate import validate_config

    _check_world(cfg, world_size, hardware_args)
    hw = C.resolve_hardware(cfg, world_size, hardware_args)
    plan = validate_config(cfg, world_size, runtime=False)
    m, par, prec = cfg.model, cfg.parallel, cfg.precision
    tp = par.tensor_model_parallel_size
    dp = par.data_parallel_size(world_size)
    setup = M.ActivationSetup.from_config(cfg)
    stages = []
    for s in plan:
        mem = M.stage_memory(
            cfg,
            s.positions,
            s.micro_batch_size,
            s.num_microbatches,
            s.patch_size,
            world_size,
            name=s.name,
        )
        stages.append(
            dict(
                s.as_dict(),
                memory=_memory_dict(mem, hw),
                time=C.stage_cost(cfg, s, hw).as_dict(),
            )
        )
    base_cfg = copy.deepcopy(cfg)
    base_cfg.stages.patch_size = 1
    [base] = make_plan(base_cfg, world_size)
    base_cost = C.stage_cost(cfg, base, hw)
    total_wall = sum(st["time"]["wall_seconds"] for st in stages)
    total_gpu_h = sum(st["time"]["gpu_hours"] for st in stages)
    total_flops = sum(st["time"]["flops"] for st in stages)
    tokens = sum(s.tokens for s in plan)
    warnings = _warnings(stages, hw)
    fp8 = prec.fp8_format is not None
    impl = "Transformer Engine" if setup.impl == "te" else "megatron-core local layers"
    report = {
        "hardware": hw.as_dict(),
        "model": {
            "num_layers": m.num_layers,
            "hidden_size": m.hidden_size,
            "ffn_hidden_size": m.resolved_ffn_hidden_size(),
            "swiglu": m.swiglu,
            "num_attention_heads": m.num_attention_heads,
            "num_query_groups": m.num_query_groups or m.num_attention_heads,
            "vocab_size": m.vocab_size,
            "padded_vocab_size": m.padded_vocab_size(tp),
            "parameters": M.total_parameters(m),
            "parameters_padded": M.total_parameters(m, m.padded_vocab_size(tp)),
        },
        "layout": {
            "world_size": world_size,
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": par.pipeline_model_parallel_size,
            "virtual_pipeline_model_parallel_size": par.virtual_pipeline_model_parallel_size,
            "data_parallel_size": dp,
            "sequence_parallel": par.sequence_parallel,
            "distributed_optimizer": cfg.optimizer.use_distributed_optimizer,
            "recompute_granularity": cfg.training.recompute_granularity,
            "recompute_method": cfg.training.recompute_method,
            "recompute_num_layers": cfg.training.recompute_num_layers,
            "precision": ("bf16" if prec.bf16 else "fp32")
            + (f"+fp8-{prec.fp8_format}" if fp8 else ""),
            "implementation": setup.impl,
        },
        "stages": stages,
        "total": {
            "tokens": tokens,
            "steps": sum(s.steps for s in plan),
            "flops": total_flops,
            "wall_seconds": total_wall,
            "gpu_hours": total_gpu_h,
            "compute_vs_token_level": total_flops / (base_cost.flops or 1.0),
        },
        "baseline": {
            "name": "token level only, same token budget",
            "tokens": base.tokens,
            "steps": base.steps,
            "bubble_fraction": base.bubble_fraction,
            **base_cost.as_dict(),
        },
        "assumptions": _assumptions(hw, impl, setup),
        "warnings": warnings,
    }
    return report, plan


def _warnings(stages: list[dict[str, Any]], hw: C.Hardware) -> list[str]:
    out = []
    for st in stages:
        mem = st["memory"]
        peak, device = mem["peak"] / GIB, mem["device"] / GIB
        where = f"pipeline rank {mem['peak_pp_rank']}"
        if peak > device:
            out.append(
                f"the {st['name']} stage needs ~{peak:.1f} GiB per GPU on {where}, more than the "
                f"{device:.0f} GiB of a {hw.gpu}: it will run out of memory. Lower "
                "--micro-batch-size, add --recompute-granularity selective (or full with "
                "--recompute-num-layers), use --use-distributed-optimizer, or raise "
                "--tensor-model-parallel-size / --pipeline-model-parallel-size"
            )
        elif peak > 0.9 * device:
            out.append(
                f"the {st['name']} stage needs ~{peak:.1f} GiB of {device:.0f} GiB per GPU on "
                f"{where} ({peak / device:.0%}): allocator fragmentation may push it over"
            )
    return out


def _assumptions(hw: C.Hardware, impl: str, setup: M.ActivationSetup) -> list[str]:
    eff = f"{hw.efficiency:.2f}" + (" (default)" if hw.efficiency_is_default else "")
    return [
        "FLOPs per step: megapatch.training.flops.flops_per_step (Megatron's count, causal "
        "attention halved; patch stage: T patch positions of B/K samples)",
        f"achieved per GPU = {hw.precision} dense peak {hw.peak_tflops:g} TFLOP/s x efficiency "
        f"{eff}; step time = compute / (1 - pipeline bubble); MFU against the same peak",
        "default efficiency from H100 anchors: 0.45 of bf16 peak (Megatron-Core GPT 7.1B: 47% "
        "MFU), 0.35 of FP8 peak (NeMo Llama-2 7B FP8: 16,847 tokens/s/GPU = 36.5%)",
        "not in the time: data loading, evaluation, checkpoint writes, start-up, restarts",
        f"memory: {impl} layers ({'FP8 GEMM inputs kept in FP8, ' if setup.fp8 else ''}"
        "activations per Korthikanti et al. 2022 as megatron-core saves them); fp32 gradient "
        "buffer; Adam with fp32 master weights; peak = model state + activations of the "
        "micro-batches in flight + the largest transient + "
        f"{M.RUNTIME_RESERVE_GIB:g} GiB runtime reserve; allocator fragmentation not modelled",
    ]


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def _hours(seconds: float) -> str:
    days = f" ({seconds / 86400:,.1f} d)" if seconds > 86400 else ""
    return f"{seconds / 3600:,.1f} h{days}"


def _header(report: dict[str, Any]) -> list[str]:
    hw, mo, lay = report["hardware"], report["model"], report["layout"]
    vpp = lay["virtual_pipeline_model_parallel_size"]
    rc = lay["recompute_granularity"] or "none"
    if rc == "full":
        rc += f" ({lay['recompute_method'] or 'uniform'}, {lay['recompute_num_layers']} layers)"
    impl = "Transformer Engine" if lay["implementation"] == "te" else "local layers"
    return [
        f"megapatch plan: {hw['world_size']} x {hw['gpu']} ({hw['nodes']} node(s) x "
        f"{hw['gpus_per_node']}), {hw['memory_gib']:g} GiB each, {hw['precision']} dense peak "
        f"{hw['peak_tflops']:g} TFLOP/s",
        f"model   {mo['num_layers']} layers, hidden {mo['hidden_size']}, FFN "
        f"{mo['ffn_hidden_size']}{' (SwiGLU)' if mo['swiglu'] else ''}, "
        f"{mo['num_attention_heads']} heads / {mo['num_query_groups']} KV groups, vocab "
        f"{mo['vocab_size']} (padded {mo['padded_vocab_size']}): "
        f"{mo['parameters'] / 1e9:.2f}B parameters",
        f"layout  TP {lay['tensor_model_parallel_size']}, PP "
        f"{lay['pipeline_model_parallel_size']}, VPP {vpp or '-'}, DP "
        f"{lay['data_parallel_size']}, SP {'on' if lay['sequence_parallel'] else 'off'}; "
        f"{'distributed' if lay['distributed_optimizer'] else 'replicated'} optimizer; "
        f"recompute {rc}; {lay['precision']} on {impl}",
    ]


def _memory_lines(report: dict[str, Any], names: list[str]) -> list[str]:
    hw, lay, stages = report["hardware"], report["layout"], report["stages"]
    mems = [s["memory"] for s in stages]

    def row(label: str, values: list[str]) -> str:
        return f"  {label:<56}" + "".join(f"{v:>14}" for v in values)

    def gib_row(label: str, get: Any) -> str:
        return row(label, [_gib(get(m)) for m in mems])

    def mib_row(label: str, get: Any) -> str:
        return row(label + ", MiB", [f"{get(m) / 2**20:,.1f}" for m in mems])

    bf16 = lay["precision"].startswith("bf16")
    dp, dist = lay["data_parallel_size"], lay["distributed_optimizer"]
    vpp, pp = lay["virtual_pipeline_model_parallel_size"], lay["pipeline_model_parallel_size"]
    opt = "optimizer state (Adam" + (" + fp32 master)" if bf16 else ")")
    transients = sorted({k for m in mems for k in m["transient"]})
    out = [
        "memory per GPU, GiB (the pipeline rank with the highest peak)",
        row("", names),
        gib_row(f"weights ({'bf16' if bf16 else 'fp32'})", lambda m: m["weights"]),
        gib_row("gradients (fp32 DDP buffer)", lambda m: m["gradients"]),
        gib_row(opt + (f", sharded over DP {dp}" if dist else ""), lambda m: m["optimizer"]),
        gib_row(
            f"  {'without' if dist else 'with'} the distributed optimizer",
            lambda m: m["optimizer_without_distributed_optimizer"] / (1 if dist else dp),
        ),
    ]
    if any(m["fp8_weight_copies"] for m in mems):
        out.append(
            gib_row("FP8 weight copies (TE: weight + transpose)", lambda m: m["fp8_weight_copies"])
        )
    out += [
        gib_row("activations per micro-batch", lambda m: m["activations_per_microbatch"]),
        row(
            "  micro-batch: samples x positions",
            [f"{s['micro_batch_size']} x {s['positions']}" for s in stages],
        ),
        mib_row("  transformer layers", lambda m: m["activations_layers_per_microbatch"]),
        mib_row(
            "  input side (token ids, K per position)",
            lambda m: sum(m["activations_per_microbatch_terms"]["input"].values()),
        ),
        mib_row(
            "  output side (fp32 softmax [positions, b, V/tp])",
            lambda m: sum(m["activations_per_microbatch_terms"]["output"].values()),
        ),
        row(
            "micro-batches in flight ("
            + ("interleaved 1F1B" if vpp else "1F1B" if pp > 1 else "no pipeline")
            + ")",
            [f"{m['microbatches_in_flight']:g}" for m in mems],
        ),
        gib_row("activations in flight", lambda m: m["activations_in_flight"]),
        gib_row(
            f"largest transient ({', '.join(transients) or 'none'})",
            lambda m: sum(m["transient"].values()),
        ),
        gib_row("runtime reserve (CUDA context, NCCL, workspaces)", lambda m: m["reserve"]),
        row("peak", [f"{_gib(m['peak'])} ({m['peak'] / m['device']:.0%})" for m in mems]),
        row(f"device ({hw['gpu']})", [f"{hw['memory_gib']:g}" for _ in mems]),
    ]
    return out


def _cost_lines(report: dict[str, Any], names: list[str]) -> list[str]:
    stages, tot, base = report["stages"], report["total"], report["baseline"]

    def line(label: str, steps: int, t: dict[str, Any] | None) -> str:
        if t is None:
            cols = ["", "", "", "", _hours(tot["wall_seconds"]), f"{tot['gpu_hours']:,.0f}"]
        else:
            cols = [
                f"{t['step_seconds']:.3f}",
                f"{t['tokens_per_s_per_gpu']:,.0f}",
                f"{t['tflops_per_gpu']:.1f}",
                f"{t['mfu']:.1%}",
                _hours(t["wall_seconds"]),
                f"{t['gpu_hours']:,.0f}",
            ]
        widths = [8, 13, 12, 6, 20, 11]
        return f"  {label:<12} {steps:>9,} " + " ".join(f"{c:>{w}}" for c, w in zip(cols, widths))

    head = ["step s", "tokens/s/GPU", "TFLOP/s/GPU", "MFU", "wall", "GPU-hours"]
    widths = [8, 13, 12, 6, 20, 11]
    out = [
        "time and cost (projected; cost model below)",
        f"  {'stage':<12} {'steps':>9} " + " ".join(f"{c:>{w}}" for c, w in zip(head, widths)),
    ]
    out += [line(n, s["steps"], s["time"]) for n, s in zip(names, stages)]
    out.append(line("total", tot["steps"], None))
    out.append(line("token only", base["steps"], base))
    saved = 1 - tot["gpu_hours"] / base["gpu_hours"] if base["gpu_hours"] else 0.0
    out.append(
        f"  {tot['tokens']:,} tokens: {tot['compute_vs_token_level']:.3f}x the FLOPs of "
        f"token-level training on the same budget; {saved:.0%} fewer GPU-hours "
        f"({tot['gpu_hours']:,.0f} vs {base['gpu_hours']:,.0f})"
    )
    return out


def format_report(report: dict[str, Any], plan: list[StagePlan] | None = None) -> str:
    """The report as text: header, stage table, memory per GPU, time and cost, assumptions."""
    names = [
        f"{s['name']} K={s['patch_size']}" if s["patch_size"] > 1 else s["name"]
        for s in report["stages"]
    ]
    lines = _header(report) + [""]
    if plan is not None:
        lines += [format_plan(plan, report["hardware"]["world_size"]), ""]
    lines += _memory_lines(report, names) + [""]
    lines += _cost_lines(report, names) + ["", "assumptions"]
    lines += [f"  - {a}" for a in report["assumptions"]]
    lines += [f"WARNING: {w}" for w in report["warnings"]]
    return "\n".join(lines)


def print_report(cfg: RunConfig, world_size: int, hardware_args: Any = None) -> dict[str, Any]:
    """Print the plan of ``cfg`` on ``world_size`` GPUs and return it as a JSON-able dict.

    ``hardware_args`` (a namespace or mapping; optional keys ``gpu``, ``gpu_memory_gib``,
    ``efficiency``, ``nodes``, ``gpus_per_node``) describes the machine; the defaults are H100s.
    Raises :class:`megapatch.config.ConfigError` on a bad config or layout.
    """
    report, plan = _build(cfg, world_size, hardware_args)
    print(format_report(report, plan))
    return report


def run(args: argparse.Namespace) -> int:
    """``megapatch plan``: exit 0 with the report, 2 on bad input."""
    try:
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise ConfigError("--nodes and --gpus-per-node must be >= 1")
        cfg = config_from_args(args)
        report = print_report(cfg, args.nodes * args.gpus_per_node, args)
        if args.json:
            _write_json(args.json, report)
            print(f"wrote {args.json}")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _write_json(path: str, report: dict[str, Any]) -> None:
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as err:
        raise ConfigError(f"--json {path}: cannot write ({err.strerror or err})") from err


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``megapatch plan``."""
    p = subparsers.add_parser(
        "plan",
        help="plan a cluster run: layout, per-GPU memory, step time and cost (no GPU needed)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    C.add_hardware_arguments(p)
    p.add_argument("--json", metavar="PATH", help="Also write the report as JSON to PATH.")
    add_run_arguments(p)
    p.set_defaults(func=run)
