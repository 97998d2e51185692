"""Patch training is exact under every parallel layout: loss, gradients, one optimizer step.

One 4-rank gloo world runs everything. The reference is a single-process TP1/PP1/DP1
computation on every rank (plain forward on the whole global batch, autograd, gradient clipping
and torch AdamW). Each layout starts from the reference weights (saved once with megatron
dist_checkpointing and resharded on load), runs megatron's pipeline schedule with DDP and the
token-weighted loss, and saves its gradients (or, for the distributed optimizer, its updated
weights) the same way; the last phase loads them back at TP1/PP1 and compares them with the
reference tensor by tensor.
"""

from __future__ import annotations

import pytest
import torch

from megapatch.runtime.spawn import run_on_ranks
from tests.helpers import fp32, make_samples, parallel, tiny_model

K, T, B = 4, 8, 4  # patch size, patches per sample, samples per global batch
# Adam eps well above the tiniest gradients: a first Adam step is ~sign(g) otherwise, which
# turns last-bit gradient differences of near-zero entries into full-size update differences.
LR, WD, CLIP, EPS = 1e-3, 0.1, 1.0, 1e-4

LAYOUTS = {
    "tp2": dict(tp=2),
    "tp2_sp": dict(tp=2, sp=True),
    "pp2": dict(pp=2),
    "pp2_vpp2": dict(pp=2, vpp=2),
    "tp2_pp2": dict(tp=2, pp=2),
    "tp2_dp2_distopt": dict(tp=2, distopt=True),
    "tp2_k1": dict(tp=2, sp=True, k=1),
}


def _optimizer_config(distopt: bool):
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer="adam",
        lr=LR,
        weight_decay=WD,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_eps=EPS,
        clip_grad=CLIP,
        use_distributed_optimizer=distopt,
    )


def _reference(model_cfg, data, root, k):
    """Single-process loss, grads and one clipped AdamW step; saves the initial weights."""
    from megapatch.model import build_model
    from megapatch.runtime import distributed as D
    from megapatch.training import checkpoint as C

    D.initialize_model_parallel(D.ParallelLayout())
    D.set_random_seeds(1234)
    [ref] = build_model(model_cfg, parallel(), fp32(), patch_size=k)
    C.save_model([ref], f"{root}/ref_k{k}")
    per_token = ref(data["tokens"], data["position_ids"], None, labels=data["labels"])
    mask = data["loss_mask"]
    loss = (per_token * mask).sum() / mask.sum()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters()}
    params = [p for _, p in ref.named_parameters()]
    norm = torch.nn.utils.clip_grad_norm_(params, CLIP)
    # megatron's default: no weight decay on biases and 1-D (norm) parameters.
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=(0.9, 0.95),
        eps=EPS,
        weight_decay=WD,
    )
    opt.step()
    stepped = {n: p.detach().clone() for n, p in ref.named_parameters()}
    return dict(loss=loss.item(), grad_norm=float(norm)), grads, stepped


def _run_layout(model_cfg, data, root, name, lay):
    from megatron.core import parallel_state

    from megapatch.model import build_model, transformer_config
    from megapatch.runtime import distributed as D
    from megapatch.training import checkpoint as C
    from megapatch.training import step as S

    k = lay.get("k", K)
    par = parallel(
        tp=lay.get("tp", 1), pp=lay.get("pp", 1), vpp=lay.get("vpp"), sp=lay.get("sp", False)
    )
    D.initialize_model_parallel(
        D.ParallelLayout(
            par.tensor_model_parallel_size,
            par.pipeline_model_parallel_size,
            par.virtual_pipeline_model_parallel_size,
        )
    )
    D.set_random_seeds(999)  # deliberately different: weights must come from the checkpoint
    cfg = transformer_config(model_cfg, par, fp32())
    chunks = build_model(model_cfg, par, fp32(), patch_size=k, config=cfg)
    C.load_model(chunks, f"{root}/ref_k{k}")
    distopt = lay.get("distopt", False)
    ddp = S.wrap_with_ddp(chunks, cfg, use_distributed_optimizer=distopt)
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    per_rank = B // dp
    micro = [
        {key: v[i : i + 1] for key, v in data.items()}
        for i in range(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    ]
    iters = [iter(list(micro)) for _ in ddp]
    kwargs = dict(num_microbatches=per_rank, micro_batch_size=1, seq_positions=T)
    if distopt:
        opt = S.build_optimizer(ddp, _optimizer_config(True))
        S.build_scheduler(opt, lr=LR, decay_style="constant", weight_decay=WD)
        res = S.train_step(ddp, opt, iters, **kwargs)
        C.save_model(ddp, f"{root}/{name}_stepped")
    else:
        for c in ddp:
            c.zero_grad_buffer()
        res = S.forward_backward(ddp, iters, **kwargs)
        with torch.no_grad():
            for c in ddp:
                for p in c.module.parameters():
                    p.copy_(p.main_grad)
        C.save_model(ddp, f"{root}/{name}_grads")
    return dict(loss=res.loss, tokens=res.tokens, grad_norm=res.grad_norm)


def _max_diff(loaded: dict, ref: dict) -> dict:
    out = {}
    for n, r in ref.items():
        got = loaded[n]
        out[n] = (float((got - r).abs().max()), float(r.abs().max()))
    return out


def _vocab_parallel_loss_tp4(rank: int) -> dict:
    """The multi-token loss on a 4-way vocab split equals the single-process loss."""
    from megatron.core import parallel_state

    from megapatch.model import vocab_parallel_multi_token_cross_entropy
    from megapatch.runtime import distributed as D

    D.initialize_model_parallel(D.ParallelLayout(tensor_model_parallel_size=4))
    group = parallel_state.get_tensor_model_parallel_group()
    g = torch.Generator().manual_seed(7)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(6, 3, 64, generator=g) * 4).to(dtype)
        targets = torch.randint(0, 64, (6, 3, 4), generator=g)
        targets[:, :, 1] = targets[:, :, 0]  # repeated target inside a patch
        weights = torch.rand(6, 3, 4, generator=g)
        full = logits.float().clone().requires_grad_()
        ref = -torch.log_softmax(full, -1).gather(-1, targets)
        (ref * weights).sum().backward()
        shard = logits[..., rank * 16 : (rank + 1) * 16].clone()
        before = shard.clone()
        mine = shard.requires_grad_()
        loss = vocab_parallel_multi_token_cross_entropy(mine, targets, group)
        (loss * weights).sum().backward()
        tol = 1e-6 if dtype == torch.float32 else 2e-2
        out[str(dtype)] = dict(
            # relative to the loss scale (losses here are ~10-20)
            loss_diff=float((loss - ref.detach()).abs().max() / ref.detach().abs().max()),
            grad_diff=float(
                (mine.grad.float() - full.grad[..., rank * 16 : (rank + 1) * 16]).abs().max()
            ),
            untouched=bool(torch.equal(shard.detach(), before)),
            tol=tol,
        )
    return out


def _world(rank: int, world: int, root: str) -> dict | None:
    from megapatch.model import build_model
    from megapatch.runtime import distributed as D
    from megapatch.training import checkpoint as C

    model_cfg = tiny_model(untie_embeddings_and_output_weights=False)  # tied: PP syncs them
    results: dict = {"layouts": {}, "grads": {}, "stepped": {}}
    results["loss_tp4"] = _vocab_parallel_loss_tp4(rank)
    refs = {}
    for k in sorted({lay.get("k", K) for lay in LAYOUTS.values()}):
        data = make_samples(B, k, T, model_cfg.vocab_size, seed=k)
        refs[k] = (data, *_reference(model_cfg, data, root, k))
        results[f"ref_k{k}"] = refs[k][1]
    for name, lay in LAYOUTS.items():
        k = lay.get("k", K)
        results["layouts"][name] = _run_layout(model_cfg, refs[k][0], root, name, lay)
    # Compare every saved tensor at TP1/PP1.
    D.initialize_model_parallel(D.ParallelLayout())
    for name, lay in LAYOUTS.items():
        k = lay.get("k", K)
        _, _, grads, stepped = refs[k]
        [m] = build_model(model_cfg, parallel(), fp32(), patch_size=k)
        kind = "stepped" if lay.get("distopt") else "grads"
        C.load_model([m], f"{root}/{name}_{kind}")
        loaded = {n: p.detach() for n, p in m.named_parameters()}
        results[kind][name] = _max_diff(loaded, stepped if kind == "stepped" else grads)
    return results


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return run_on_ranks(_world, 4, str(root), timeout_s=900)


def _ref(world, name):
    return world[0][f"ref_k{LAYOUTS[name].get('k', K)}"]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_loss_equals_single_process(world, name):
    got, ref = world[0]["layouts"][name]["loss"], _ref(world, name)["loss"]
    assert abs(got - ref) <= 1e-6 * max(1.0, abs(ref)), (name, got, ref)


@pytest.mark.parametrize("name", [n for n, lay in LAYOUTS.items() if not lay.get("distopt")])
def test_gradients_equal_single_process(world, name):
    diffs = world[0]["grads"][name]
    assert diffs, "no gradients compared"
    bad = {n: d for n, d in diffs.items() if d[0] > 1e-5 * max(d[1], 1e-3)}
    assert not bad, f"{name}: gradients differ from the single-process reference: {bad}"


def test_distributed_optimizer_step_equals_single_process(world):
    name = "tp2_dp2_distopt"
    lay = world[0]["layouts"][name]
    ref = _ref(world, name)
    assert lay["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    diffs = world[0]["stepped"][name]
    # One Adam step moves weights by ~LR; compare far below that.
    bad = {n: d for n, d in diffs.items() if d[0] > 1e-3 * LR}
    assert not bad, f"updated weights differ from the single-process AdamW step: {bad}"


def test_every_layout_counts_the_same_tokens(world):
    counts = {n: r["tokens"] for n, r in world[0]["layouts"].items() if LAYOUTS[n].get("k", K) == K}
    assert len(set(counts.values())) == 1, counts


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_vocab_parallel_loss_on_four_shards(world, dtype):
    for rank, res in enumerate(world):
        r = res["loss_tp4"][dtype]
        assert r["loss_diff"] <= r["tol"], (rank, r)
        assert r["grad_diff"] <= r["tol"], (rank, r)
        assert r["untouched"], f"rank {rank}: the caller's {dtype} logits were modified"
