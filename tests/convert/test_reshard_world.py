"""Resharding TP2xPP2 -> TP1 -> TP4 -> TP2xPP2, export/import at TP2xPP2: ONE 4-rank world.

The vocabulary (250 tokens, ``make_vocab_size_divisible_by`` 128) is padded to 256 at TP1 and
TP2 but to 512 at TP4, so the TP4 step re-pads and the way back shrinks again. A model is
trained for three optimizer steps at TP2xPP2 and saved with its optimizer; every resharded
checkpoint is loaded at its own layout and evaluated with megatron's pipeline schedule:

* the training loss (megapatch masks the padding rows out of its softmax) equals the loss over
  the real vocabulary computed with megatron's own cross-entropy on masked logits (what
  transformers computes), and is the same everywhere, re-padding included; bit for bit the same
  after the round trip, whose tensors all equal the original's;
* megatron's unmasked loss (softmax over the padded vocabulary) is the same where the padding
  is (also at PP2 with interleaving) and moves when the TP4 step re-pads: the masking matters;
* the resharded optimizer state continues training exactly as the original would have (a
  fresh optimizer, the control, does not);
* the TP2xPP2 checkpoint exported to Hugging Face and imported back at TP2xPP2 gives the same
  loss, and transformers computes the same logits as megapatch at TP1.
"""

from __future__ import annotations

import os

import pytest
import torch

from megapatch.runtime.spawn import run_on_ranks
from tests.convert.conftest import checkpoint_meta
from tests.helpers import fp32, parallel, tiny_model

V, SEQ, B = 250, 32, 4
MODEL = tiny_model(  # GQA that TP4 can split: 8 heads in 4 groups
    vocab_size=V, make_vocab_size_divisible_by=128, num_attention_heads=8, num_query_groups=4
)
LR, EPS = 1e-2, 1e-4  # Adam eps well above tiny gradients (see tests/model/test_parallel_layouts)
TOL = 2e-5  # across layouts: different reduction orders


def _data(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, SEQ + 1), generator=g)
    return dict(
        tokens=x[:, :-1].contiguous(),
        labels=x[:, 1:].contiguous(),
        loss_mask=torch.ones(B, SEQ),
        position_ids=torch.arange(SEQ).expand(B, -1).contiguous(),
    )


def _layout(tp: int, pp: int, vpp: int | None = None):
    from megapatch.runtime import distributed as D

    D.initialize_model_parallel(D.ParallelLayout(tp, pp, vpp))
    return parallel(tp=tp, pp=pp, vpp=vpp)


def _micro(data: dict) -> list[dict]:
    from megatron.core import parallel_state

    dp = parallel_state.get_data_parallel_world_size()
    r = parallel_state.get_data_parallel_rank()
    per = B // dp
    return [{k: v[i : i + 1] for k, v in data.items()} for i in range(r * per, (r + 1) * per)]


def _reduce(reports: list[dict], key: str = "lm loss") -> float:
    from megatron.core import parallel_state

    total = torch.zeros(2, dtype=torch.float64)
    for rep in reports:
        total += rep[key].double()
    torch.distributed.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return float(total[0] / total[1])


def _losses(chunks, data) -> tuple[float, float, float]:
    """(megapatch's training loss, the loss over the real vocabulary, megatron's unmasked loss
    over the padded vocabulary); the last two from megatron's vocab-parallel cross-entropy."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megapatch.training import step as S

    micro = _micro(data)
    kw = dict(num_microbatches=len(micro), micro_batch_size=1, seq_length=SEQ, forward_only=True)
    training = S.forward_backward(
        chunks,
        [iter(list(micro)) for _ in chunks],
        num_microbatches=len(micro),
        micro_batch_size=1,
        seq_positions=SEQ,
        forward_only=True,
    ).loss
    tp_rank = parallel_state.get_tensor_model_parallel_rank()

    def forward_step(it, model):
        b = next(it)
        out = model(b["tokens"], b["position_ids"], None)  # vocab-parallel logits (last stage)

        def loss_func(logits):
            v_local = logits.size(-1)
            ids = torch.arange(v_local) + tp_rank * v_local
            masked = logits.float().masked_fill(ids >= V, float("-inf"))  # a new tensor
            loss = tensor_parallel.vocab_parallel_cross_entropy(masked, b["labels"])
            padded = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), b["labels"])
            s, n = loss.sum(), torch.tensor(loss.numel())
            rep = {"lm loss": torch.stack([s.detach(), n.float()])}
            rep["padded loss"] = torch.stack([padded.sum().detach(), n.float()])
            return s, n, rep

        return out, loss_func

    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(list(micro)) for _ in chunks] if len(chunks) > 1 else iter(micro),
        model=chunks,
        **kw,
    )
    return training, _reduce(reports), _reduce(reports, "padded loss")


def _setup(par, path=None, *, with_optimizer=True):
    """Model chunks (DDP), optimizer and scheduler at ``par``, loaded from ``path``."""
    from megatron.core.optimizer import OptimizerConfig

    from megapatch.model import build_model, transformer_config
    from megapatch.runtime import distributed as D
    from megapatch.training import checkpoint as C
    from megapatch.training import step as S

    D.set_random_seeds(1 if path is None else 999)
    cfg = transformer_config(MODEL, par, fp32())
    ddp = S.wrap_with_ddp(build_model(MODEL, par, fp32(), config=cfg), cfg)
    opt = S.build_optimizer(
        ddp, OptimizerConfig(optimizer="adam", lr=LR, min_lr=0.0, adam_eps=EPS, clip_grad=1.0)
    )
    sched = S.build_scheduler(opt, lr=LR, decay_style="constant")
    if path is not None:
        if with_optimizer:
            C.load_checkpoint(path, ddp, optimizer=opt, scheduler=sched)
        else:
            C.load_checkpoint(path, ddp)
    return ddp, opt, sched


def _train(ddp, opt, data) -> float:
    from megapatch.training import step as S

    micro = _micro(data)
    return S.train_step(
        ddp,
        opt,
        [iter(list(micro)) for _ in ddp],
        num_microbatches=len(micro),
        micro_batch_size=1,
        seq_positions=SEQ,
    ).loss


def _all_tensors(path: str) -> dict[str, torch.Tensor]:
    from megapatch.convert.dist_io import DistCheckpoint, Request

    ckpt = DistCheckpoint(path)
    loaded = ckpt.load([Request(k) for k in sorted(ckpt.tensors)])
    return {r.key: t for r, t in loaded.items()}


def _world(rank: int, world: int, root: str) -> dict | None:
    from megapatch.convert.export import export_to_hf
    from megapatch.convert.importer import import_from_hf
    from megapatch.convert.reshard import reshard
    from megapatch.training import checkpoint as C

    evaluation, train = _data(0), [_data(s) for s in (1, 2, 3, 4)]
    out: dict = {}

    # Train at TP2 x PP2 and save with the optimizer; the next step is the reference.
    par = _layout(2, 2)
    ddp, opt, sched = _setup(par)
    for data in train[:3]:
        _train(ddp, opt, data)
        sched.step(1)
    meta = checkpoint_meta(MODEL, par, fp32(), None)
    a = C.save_checkpoint(f"{root}/a", 3, ddp, meta, optimizer=opt, scheduler=sched)
    out["a"] = _losses(ddp, evaluation)
    _train(ddp, opt, train[3])
    out["a_next"] = _losses(ddp, evaluation)

    # TP2xPP2 -> TP1 (same padding): the loss, and the optimizer continues exactly.
    b = reshard(a, f"{root}/b", parallel(), report=None).path
    par = _layout(1, 1)
    ddp, opt, _ = _setup(par, b)
    out["b"] = _losses(ddp, evaluation)
    if rank == 0:
        with torch.no_grad():
            x = evaluation
            out["tp1_logits"] = ddp[0](x["tokens"][:2], x["position_ids"][:2], None)[..., :V]
    _train(ddp, opt, train[3])
    out["b_next"] = _losses(ddp, evaluation)
    ddp, opt, _ = _setup(par, b, with_optimizer=False)  # control: a fresh optimizer
    _train(ddp, opt, train[3])
    out["b_fresh_next"] = _losses(ddp, evaluation)

    # TP1 -> TP4: the vocabulary is re-padded from 256 to 512 rows.
    c = reshard(b, f"{root}/c", parallel(tp=4), report=None)
    out["c_padded"] = c.padded_vocab_size
    par = _layout(4, 1)
    ddp, opt, _ = _setup(par, c.path)
    out["c"] = _losses(ddp, evaluation)
    _train(ddp, opt, train[3])  # the resharded optimizer state loads and steps at TP4
    out["c_next"] = _losses(ddp, evaluation)

    # ... and back to TP2 x PP2: every tensor (weights and optimizer state) as saved.
    d = reshard(c.path, f"{root}/d", parallel(tp=2, pp=2), report=None).path
    par = _layout(2, 2)
    ddp, *_ = _setup(par, d)
    out["d"] = _losses(ddp, evaluation)
    ddp, *_ = _setup(_layout(1, 2, vpp=2), d, with_optimizer=False)  # interleaved, DP2
    out["d_vpp"] = _losses(ddp, evaluation)
    ta, td = _all_tensors(a), _all_tensors(d)
    if rank == 0:
        out["round_trip_keys"] = (sorted(ta) == sorted(td), len(ta))
        out["round_trip_equal"] = [k for k in ta if not torch.equal(ta[k], td[k])]

    # Export the TP2xPP2 checkpoint, import it back for TP2xPP2.
    export_to_hf(a, f"{root}/hf", report=None)
    e = import_from_hf(f"{root}/hf", f"{root}/e", parallel=parallel(tp=2, pp=2), report=None)
    par = _layout(2, 2)
    ddp, *_ = _setup(par, e.path, with_optimizer=False)  # an import holds weights only
    out["e"] = _losses(ddp, evaluation)
    out["e_meta"] = {k: C.read_meta(e.path)[k] for k in ("parallel", "padded_vocab_size")}
    return out if rank == 0 else None


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("reshard"))
    [out, *_] = run_on_ranks(_world, 4, root, timeout_s=900)
    out["root"] = root
    return out


def test_every_layout_gives_the_same_loss(world):
    ref_training, ref_real, ref_padded = world["a"]
    print(f"\nat TP2xPP2: training {ref_training:.6f} real {ref_real:.6f} padded {ref_padded:.6f}")
    for name in ("b", "c", "d", "d_vpp", "e"):
        training, real, padded = world[name]
        print(f"  {name}: training {training:.6f} real {real:.6f} padded {padded:.6f}")
        assert abs(real - ref_real) < TOL, name
        assert abs(training - real) < TOL, name  # the training loss is the real-vocabulary one
    # Same padding (256 rows): megatron's unmasked loss agrees too.
    assert abs(world["b"][2] - ref_padded) < TOL
    assert abs(world["d_vpp"][2] - ref_padded) < TOL


def test_round_trip_restores_every_tensor_bit_for_bit(world):
    same_keys, n = world["round_trip_keys"]
    assert same_keys and n > 20  # weights and Adam state (param, exp_avg, exp_avg_sq)
    assert world["round_trip_equal"] == []
    assert world["d"] == world["a"]  # same layout, same tensors: identical losses
    assert world["e"] == world["a"]  # export -> import restores the padding rows as well


def test_repadding_changes_only_megatrons_padded_softmax(world):
    assert world["c_padded"] == (256, 512)
    # 256 more padding logits in megatron's unmasked softmax raise its loss a little (new rows
    # are the mean of the real rows: at most log(1 + 256/250)); the training loss, whose
    # softmax spans the real vocabulary only, does not move.
    delta = world["c"][2] - world["a"][2]
    print(f"\nmegatron's unmasked loss change from re-padding 256 -> 512 rows: {delta:+.5f}")
    assert 0 < delta < torch.log(torch.tensor(1 + 256 / 250)).item()
    assert abs(world["c"][0] - world["a"][0]) < TOL


def test_resharded_optimizer_state_continues_training(world):
    ref = world["a_next"][1]
    assert abs(world["b_next"][1] - ref) < TOL
    assert abs(world["b_fresh_next"][1] - ref) > 50 * TOL  # the control: state matters
    assert abs(world["c_next"][1] - ref) < 1e-2  # TP4: new padding rows perturb slightly


def test_export_from_tp2pp2_matches_transformers(world):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(os.path.join(world["root"], "hf"), dtype=torch.float32)
    x = _data(0)
    with torch.no_grad():
        theirs = hf.eval()(x["tokens"][:2]).logits
    assert float((theirs - world["tp1_logits"]).abs().max()) <= 1e-4


def test_import_records_the_target_layout(world):
    meta = world["e_meta"]
    assert meta["padded_vocab_size"] == 256
    assert meta["parallel"]["tensor_model_parallel_size"] == 2
    assert meta["parallel"]["pipeline_model_parallel_size"] == 2
