"""Export to Hugging Face Llama and import back, checked against transformers itself.

One small Llama-style model (GQA, untied, vocabulary 500 padded to 512) is trained for 30
optimizer steps on real text in this process (one gloo rank; it memorises a few windows, so
that greedy decoding continues them with varied tokens) and saved as a training checkpoint.
transformers must load the export unchanged and compute the same logits and greedy
continuations; importing the export must give back the checkpoint bit for bit. Checkpoints
written by transformers itself (sharded, tied, with biases) import to the same logits.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from megapatch.cli import main as cli_main
from megapatch.convert.dist_io import DistCheckpoint, Request
from megapatch.convert.export import PADDING_FILE, export_to_hf
from megapatch.convert.importer import import_from_hf
from megapatch.convert.info import checkpoint_info, format_info
from megapatch.model import build_model, transformer_config
from megapatch.runtime import distributed as D
from megapatch.training import checkpoint as C
from megapatch.training import step as S
from tests.convert.conftest import batch, checkpoint_meta, corpus_texts, text_samples
from tests.helpers import fp32, parallel, tiny_model

V = 500
MODEL = tiny_model(vocab_size=V, make_vocab_size_divisible_by=128, max_position_embeddings=512)
STEPS, MICRO, SEQ = 30, 4, 64
LOGITS_TOL = 1e-4


def _build(model_cfg=MODEL, seed=99):
    D.initialize_model_parallel(D.ParallelLayout())
    D.set_random_seeds(seed)  # deliberately not the training seed: weights come from files
    [m] = build_model(model_cfg, parallel(), fp32())
    return m


def _load(path, model_cfg=MODEL):
    m = _build(model_cfg)
    C.load_checkpoint(path, [m])
    return m.eval()


@pytest.fixture(scope="module")
def trained(single_rank, spm_500, tmp_path_factory):
    """A few optimizer steps on real text, saved the way the training loop saves."""
    from megatron.core.optimizer import OptimizerConfig

    D.initialize_model_parallel(D.ParallelLayout())
    D.set_random_seeds(1234)
    cfg = transformer_config(MODEL, parallel(), fp32())
    chunks = build_model(MODEL, parallel(), fp32(), config=cfg)
    init = {n: p.detach().clone() for n, p in chunks[0].named_parameters()}
    ddp = S.wrap_with_ddp(chunks, cfg)
    opt = S.build_optimizer(
        ddp, OptimizerConfig(optimizer="adam", lr=1e-2, min_lr=0.0, clip_grad=1.0)
    )
    sched = S.build_scheduler(opt, lr=1e-2, decay_style="constant")
    data = text_samples(spm_500, 2 * MICRO, SEQ)  # two batches, seen 15 times each
    losses = []
    for step in range(STEPS):
        first = (step % 2) * MICRO
        micro = [batch(data[first + i : first + i + 1]) for i in range(MICRO)]
        res = S.train_step(
            ddp, opt, [iter(micro)], num_microbatches=MICRO, micro_batch_size=1, seq_positions=SEQ
        )
        losses.append(res.loss)
    root = str(tmp_path_factory.mktemp("run") / "checkpoints")
    meta = checkpoint_meta(MODEL, parallel(), fp32(), spm_500)
    C.save_checkpoint(root, STEPS, ddp, meta, optimizer=opt, scheduler=sched)
    moved = max(float((p.detach() - init[n]).abs().max()) for n, p in chunks[0].named_parameters())
    # Held-out real text (after the training windows) for the comparisons.
    held_out = text_samples(spm_500, 2, 128, skip=2 * MICRO * (SEQ + 1) + 1000)
    hf_dir = str(tmp_path_factory.mktemp("hf") / "llama")
    export = export_to_hf(root, hf_dir, report=None)
    return dict(
        root=root, ckpt=C.find_latest(root), losses=losses, moved=moved, held_out=held_out,
        hf_dir=hf_dir, export=export, spm=spm_500, prompts=data[[1, 6], :24],
    )  # fmt: skip


def _hf_model(path, dtype=torch.float32):
    from transformers import LlamaForCausalLM

    model, info = LlamaForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    return model.eval(), info


def _real_vocab_loss(logits: torch.Tensor, labels: torch.Tensor, vocab: int) -> float:
    """Cross-entropy over the real vocabulary (what transformers computes)."""
    return float(
        torch.nn.functional.cross_entropy(logits[..., :vocab].flatten(0, 1), labels.flatten())
    )


def test_training_moved_the_weights(trained):
    assert trained["moved"] > 1e-3  # not the initialisation
    assert trained["losses"][-1] < trained["losses"][0]


def test_transformers_loads_the_export_with_the_same_logits(trained):
    hf, info = _hf_model(trained["hf_dir"])
    assert info["missing_keys"] == set() or info["missing_keys"] == []
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = _load(trained["ckpt"])
    x = trained["held_out"]
    with torch.no_grad():
        b = batch(x)
        mine = ours(b["tokens"], b["position_ids"], None)
        theirs = hf(b["tokens"]).logits
    assert mine.shape[-1] == 512 and theirs.shape[-1] == V
    diff = float((mine[..., :V] - theirs).abs().max())
    print(f"\nmax |logits megapatch - transformers| = {diff:.2e} (fp32, {tuple(theirs.shape)})")
    assert diff <= LOGITS_TOL
    # the same loss too (transformers' own loss function shifts the labels itself)
    with torch.no_grad():
        hf_loss = float(hf(b["tokens"], labels=b["tokens"]).loss)
    mine_loss = _real_vocab_loss(mine[:, :-1], b["tokens"][:, 1:], V)
    assert abs(mine_loss - hf_loss) < 1e-5


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_the_export_has_megapatch_s_patch_loss_at_every_k(trained, k):
    """The trained model is the exported one: its loss spans the real vocabulary (megapatch
    masks the padding rows, which the export drops). The patch loss at K, computed on the
    transformers model by hand (mean of K input embeddings, RoPE over patch indices, K targets
    under one softmax), equals megapatch's PatchGPTModel loss at K in fp32."""
    hf, _ = _hf_model(trained["hf_dir"])
    ours = _load(trained["ckpt"])
    ours.set_patch_size(k)
    x = trained["held_out"]  # [2, 129]
    t = (x.size(1) - k) // k  # patches per sample
    tokens, labels = x[:, : k * t], x[:, k : k * t + k]
    with torch.no_grad():
        positions = (torch.arange(k * t) // k).expand(x.size(0), -1)
        mine = float(ours(tokens, positions, None, labels=labels).mean())
        emb = hf.model.embed_tokens(tokens).view(x.size(0), t, k, -1).mean(dim=2)
        logits = hf(inputs_embeds=emb, position_ids=torch.arange(t)[None]).logits
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # [b, T, V]: real rows only
        theirs = float(-log_probs.gather(-1, labels.view(x.size(0), t, k)).mean())
    print(f"\nK={k}: patch loss megapatch {mine:.6f}, transformers {theirs:.6f}")
    assert mine == pytest.approx(theirs, rel=1e-5)


def test_greedy_continuations_are_identical(trained):
    from transformers import GenerationConfig

    hf, _ = _hf_model(trained["hf_dir"])
    ours = _load(trained["ckpt"])
    prompts = trained["prompts"]  # from the memorised windows
    gen = GenerationConfig(do_sample=False, max_new_tokens=20, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        theirs = hf.generate(prompts, generation_config=gen)[:, 24:]
        ids = prompts.clone()
        for _ in range(20):
            pos = torch.arange(ids.size(1)).expand(ids.size(0), -1)
            nxt = ours(ids, pos, None)[:, -1, :V].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert theirs.shape == (2, 20)
    assert torch.equal(ids[:, 24:], theirs)
    for row in theirs.tolist():  # real continuations, not one token repeated
        assert len(set(row)) >= 3, row


def test_tokenizer_files_encode_like_sentencepiece(trained):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=trained["spm"])
    tok = AutoTokenizer.from_pretrained(trained["hf_dir"])
    texts = corpus_texts("topics", limit=60) + [
        "Ünïcödé: 漢字, emoji 🙂, math ∑ x² ≤ ∞.",
        "  leading spaces, trailing spaces  ",
        "tabs\tand\r\nwindows line ends\nand a NUL \x00 byte",
        "a  b   c    d\n\n\n    indented",
    ]
    for text in texts:
        ids = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ids, text[:60]
        assert tok.decode(ids) == sp.decode(ids)
    assert tok.eos_token_id == sp.eos_id() and tok.bos_token_id == sp.bos_id()
    assert tok("hello").input_ids == sp.encode("hello")  # the export adds no BOS (data had none)


def test_config_generation_config_and_provenance(trained):
    d = trained["hf_dir"]
    cfg = json.load(open(os.path.join(d, "config.json")))
    assert cfg["vocab_size"] == V  # no TP padding
    assert cfg["num_key_value_heads"] == 2 and cfg["num_attention_heads"] == 4
    assert cfg["intermediate_size"] == 96 and cfg["head_dim"] == 16
    assert cfg["rope_theta"] == 10000.0 and cfg["rms_norm_eps"] == 1e-5
    assert cfg["tie_word_embeddings"] is False and cfg["eos_token_id"] == 2
    gen = json.load(open(os.path.join(d, "generation_config.json")))
    assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 1
    prov = json.load(open(os.path.join(d, "megapatch_export.json")))
    assert (
        prov["step"] == STEPS and prov["tokens_seen"] == 12345 and prov["padded_vocab_size"] == 512
    )
    assert trained["export"].files == sorted(
        [
            "config.json", "generation_config.json", "megapatch_export.json", PADDING_FILE,
            "model.safetensors", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
            "tokenizer_config.json",
        ]
    )  # fmt: skip


def _all_tensors(path: str) -> dict[str, torch.Tensor]:
    ckpt = DistCheckpoint(path)
    keys = sorted(k for k in ckpt.tensors if not k.startswith("optimizer."))
    loaded = ckpt.load([Request(k) for k in keys])
    return {r.key: t for r, t in loaded.items()}


def test_import_of_the_export_is_bitwise_identical(trained, tmp_path):
    res = import_from_hf(trained["hf_dir"], str(tmp_path / "imported"), report=None)
    assert res.path.endswith("iter_0000000")
    original, imported = _all_tensors(trained["ckpt"]), _all_tensors(res.path)
    assert original.keys() == imported.keys()
    for key, t in original.items():
        assert imported[key].dtype == t.dtype and torch.equal(imported[key], t), key
    # The same loss, megatron's own (softmax over the padded vocabulary) and transformers'.
    b = batch(trained["held_out"])
    losses = []
    for path in (trained["ckpt"], res.path):
        m = _load(path)
        with torch.no_grad():
            per_token = m(b["tokens"], b["position_ids"], None, labels=b["labels"])
            logits = m(b["tokens"], b["position_ids"], None)
        losses.append((float(per_token.mean()), _real_vocab_loss(logits, b["labels"], V)))
    assert losses[0] == losses[1]
    meta = C.read_meta(res.path)
    assert meta["step"] == 0 and meta["stage"] == 0 and meta["model_only"]
    assert meta["model"] == C.read_meta(trained["ckpt"])["model"]
    assert meta["padded_vocab_size"] == 512


def test_import_for_another_tensor_parallel_size_repads_with_mean_rows(trained, tmp_path):
    """TP4 pads 500 to 512 too; divisible-by 160 x TP2 pads to 640: 12 kept, 128 new rows."""
    from megapatch.config import ParallelConfig

    res = import_from_hf(
        trained["hf_dir"], str(tmp_path / "tp2"), make_vocab_size_divisible_by=160,
        parallel=ParallelConfig(tensor_model_parallel_size=2), report=None,
    )  # fmt: skip
    assert res.padded_vocab_size == 640
    original, imported = _all_tensors(trained["ckpt"]), _all_tensors(res.path)
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        assert torch.equal(imported[key][:512], original[key])
        mean = original[key][:V].double().mean(0).float()
        assert torch.equal(imported[key][512:], mean.expand(128, -1))


def test_a_non_sentencepiece_tokenizer_file_is_skipped_on_import(trained, tmp_path):
    """Llama-3 directories may hold a tiktoken ``tokenizer.model``: import without a tokenizer."""
    src = tmp_path / "hf"
    shutil.copytree(trained["hf_dir"], src)
    (src / "tokenizer.model").write_bytes(b"IQ== 0\nIg== 1\n")  # tiktoken's format
    notes = []
    res = import_from_hf(str(src), str(tmp_path / "ckpt"), report=notes.append)
    assert C.read_meta(res.path)["tokenizer_model"] is None
    assert any("not a sentencepiece model" in n for n in notes)


# --------------------------------------------------------------- checkpoints from transformers
@pytest.mark.parametrize(
    "variant", [dict(), dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)]
)
def test_import_of_a_transformers_checkpoint(single_rank, tmp_path, spm_500, variant):
    """Random LlamaForCausalLM saved by transformers (3 shards + index) imports exactly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=V, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-6,
        rope_theta=20000.0, max_position_embeddings=256, **variant,
    )  # fmt: skip
    hf = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():  # norms and biases away from their 1/0 initialisation
            p.add_(torch.randn_like(p) * 0.05)
    src = tmp_path / "hf"
    hf.save_pretrained(src, max_shard_size="100KB")
    shutil.copyfile(spm_500, src / "tokenizer.model")
    assert len([f for f in os.listdir(src) if f.endswith(".safetensors")]) >= 3
    res = import_from_hf(str(src), str(tmp_path / "ckpt"), report=None)
    meta = C.read_meta(res.path)
    model_cfg = tiny_model(**meta["model"])
    assert model_cfg.kv_channels == 12 and model_cfg.num_query_groups == 2
    assert model_cfg.untie_embeddings_and_output_weights == (not variant)
    assert model_cfg.add_bias_linear == bool(variant) and model_cfg.rotary_base == 20000
    ours = _load(res.path, model_cfg)
    x = text_samples(spm_500, 2, 64)
    with torch.no_grad():
        mine = ours(x, torch.arange(64).expand(2, -1), None)
        theirs = hf(x).logits
    assert float((mine[..., :V] - theirs).abs().max()) <= LOGITS_TOL


# ----------------------------------------------------------------------------- bad input
def _cli(capsys, *argv) -> tuple[int, str]:
    code = cli_main(list(argv))
    err = capsys.readouterr().err
    return code, err


def test_bad_inputs_fail_early_with_the_file_and_the_fix(trained, tmp_path, capsys):
    from tests.convert.conftest import train_small_tokenizer

    hf_dir = trained["hf_dir"]
    out = str(tmp_path / "out")

    # A non-Llama Hugging Face config.
    mistral = tmp_path / "mistral"
    shutil.copytree(hf_dir, mistral)
    cfg = json.load(open(mistral / "config.json"))
    cfg.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (mistral / "config.json").write_text(json.dumps(cfg))
    code, err = _cli(capsys, "convert", "import", "--load", str(mistral), "--save", out)
    assert code == 2 and "config.json" in err and "model_type 'mistral'" in err
    assert not os.path.exists(out)

    # Missing shards.
    sharded = tmp_path / "sharded"
    export_to_hf(trained["root"], str(sharded), max_shard_size=200_000, report=None)
    shards = sorted(f for f in os.listdir(sharded) if f.startswith("model-"))
    assert len(shards) >= 2
    os.remove(sharded / shards[1])
    code, err = _cli(capsys, "convert", "import", "--load", str(sharded), "--save", out)
    assert code == 2 and shards[1] in err and "model.safetensors.index.json" in err
    assert "download" in err and not os.path.exists(out)

    # A tokenizer whose size does not match the model's vocabulary, both directions.
    other = train_small_tokenizer(str(tmp_path / "spm400"), 400)
    code, err = _cli(
        capsys, "convert", "export", "--load", trained["root"], "--save", out,
        "--tokenizer-model", other,
    )  # fmt: skip
    assert code == 2 and "400 pieces" in err and "vocab_size is 500" in err
    assert "--tokenizer-model" in err and not os.path.exists(out)
    code, err = _cli(
        capsys, "convert", "import", "--load", hf_dir, "--save", out, "--tokenizer-model", other
    )
    assert code == 2 and "400 pieces" in err and "vocab_size 500" in err

    # Incomplete checkpoints: an interrupted save, and megatron files missing.
    root = tmp_path / "root"
    shutil.copytree(trained["ckpt"], root / "iter_0000009.partial")
    os.remove(root / "iter_0000009.partial" / "megapatch.json")
    code, err = _cli(capsys, "convert", "export", "--load", str(root), "--save", out)
    assert code == 2 and "iter_0000009.partial" in err and "interrupted" in err
    code, err = _cli(capsys, "ckpt", "info", str(root / "iter_0000009.partial"))
    assert code == 2 and "incomplete" in err
    broken = tmp_path / "broken" / "iter_0000004"
    shutil.copytree(trained["ckpt"], broken)
    os.remove(broken / ".metadata")
    code, err = _cli(capsys, "convert", "export", "--load", str(broken), "--save", out)
    assert code == 2 and "incomplete" in err and ".metadata" in err

    # A target tensor-parallel size that does not divide the heads / KV groups.
    code, err = _cli(
        capsys, "convert", "import", "--load", hf_dir, "--save", out,
        "--tensor-model-parallel-size", "3",
    )  # fmt: skip
    assert code == 2 and "--tensor-model-parallel-size (3) must divide" in err
    code, err = _cli(
        capsys, "convert", "reshard", "--load", trained["root"], "--save", out,
        "--tensor-model-parallel-size", "4",
    )  # fmt: skip
    assert code == 2 and "--num-query-groups (2)" in err
    assert not os.path.exists(out)

    # An existing output without --force; with it, only an earlier output of the same command
    # is replaced, never anything else.
    os.makedirs(out)
    (tmp_path / "out" / "keep.txt").write_text("x")
    for argv in (
        ("convert", "export", "--load", trained["root"], "--save", out),
        ("convert", "import", "--load", hf_dir, "--save", out),
        ("convert", "reshard", "--load", trained["root"], "--save", out),
    ):
        code, err = _cli(capsys, *argv)
        assert code == 2 and f"{out} exists; pass --force" in err
        code, err = _cli(capsys, *argv, "--force")
        assert code == 2 and "is not an earlier output of this command" in err
    assert os.listdir(out) == ["keep.txt"]
    fresh = str(tmp_path / "fresh")
    for _ in range(2):  # the second time --force replaces the first export
        code, _ = _cli(capsys, "convert", "export", "--load", trained["root"], "--save", fresh,
                       "--force")  # fmt: skip
        assert code == 0 and "model.safetensors" in os.listdir(fresh)


def test_no_command_writes_over_or_deletes_its_input(trained, tmp_path, capsys):
    """`convert export --force --save RUN_DIR` used to delete the run directory with the
    checkpoints it was exporting; reshard into its own root would replace its input."""
    run_dir = tmp_path / "run"
    shutil.copytree(os.path.dirname(trained["root"]), run_dir)
    root = str(run_dir / "checkpoints")
    before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    for argv in (
        ("convert", "export", "--load", root, "--save", str(run_dir)),
        ("convert", "export", "--load", root, "--save", root),
        ("convert", "export", "--load", root, "--save", os.path.join(root, "hf")),
        ("convert", "reshard", "--load", root, "--save", root),
        ("convert", "import", "--load", trained["hf_dir"], "--save", trained["hf_dir"]),
    ):
        code, err = _cli(capsys, *argv, "--force")
        assert code == 2 and "overlaps the input" in err and "never writes over" in err, argv
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == before
    # A training run's checkpoint root is not a reshard output: --force does not replace it.
    other = tmp_path / "other" / "checkpoints"
    shutil.copytree(root, other)
    code, err = _cli(capsys, "convert", "reshard", "--load", trained["root"], "--save",
                     str(other), "--force")  # fmt: skip
    assert code == 2 and "not an earlier output" in err


def test_export_refuses_non_finite_weights(trained, tmp_path, capsys):
    """A checkpoint with NaN weights (written before the training loop refused to write
    them, or by other tools) is not exported: the error names the tensor."""
    m = _load(trained["ckpt"])
    with torch.no_grad():
        m.decoder.layers[2].mlp.linear_fc2.weight[0, :3] = float("nan")
    root = str(tmp_path / "nan" / "checkpoints")
    meta = C.read_meta(trained["ckpt"])
    C.save_checkpoint(root, 31, [m], {k: v for k, v in meta.items() if k != "files"})
    out = str(tmp_path / "hf_nan")
    code, err = _cli(capsys, "convert", "export", "--load", root, "--save", out)
    assert code == 2 and "holds 3 NaN/Inf values" in err and "linear_fc2.weight (layer 2)" in err
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")


def test_ckpt_info(trained, capsys):
    info = checkpoint_info(trained["root"])  # a root: its latest checkpoint
    assert info["path"] == trained["ckpt"] and info["step"] == STEPS and info["stage"] == 1
    assert info["tokens_seen"] == 12345 and info["layout"] == "TP1 PP1"
    hidden, ffn, layers = 64, 96, 4
    per_layer = hidden * (4 * 16 + 2 * 2 * 16) + hidden * 64 + 3 * hidden * ffn + 2 * hidden
    expected = 2 * 512 * hidden + layers * per_layer + hidden
    assert info["parameters"] == expected
    assert info["parameters_without_padding"] == expected - 2 * 12 * hidden
    assert info["contents"] == ["model", "optimizer", "scheduler", "rng"]  # plain optimizer
    text = format_info(info)
    assert (
        "padded vocab 512 (vocab 500)" in text and "4 heads (2 query groups, head dim 16)" in text
    )
    assert cli_main(["ckpt", "info", trained["root"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == expected
