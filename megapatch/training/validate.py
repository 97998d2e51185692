"""Every check that needs only the config, the data files and the world size: one clear error
(naming the flag and the fix) before any process group, model or dataset is built."""

from __future__ import annotations

import os

from megapatch.config import ConfigError, RunConfig
from megapatch.training.plan import StagePlan, make_plan


def validate_config(cfg: RunConfig, world_size: int, *, runtime: bool = True) -> list[StagePlan]:
    """Validate ``cfg`` for ``world_size`` ranks; return the stage plan.

    ``runtime=False`` plans a run for another machine (a laptop planning an H100 job): what only
    that machine has (Transformer Engine for FP8, the data files, a --load checkpoint) is not
    checked; every shape and setting is.
    """
    from megapatch.model.specs import use_transformer_engine

    m, par, prec, tr, opt, ck = (
        cfg.model,
        cfg.parallel,
        cfg.precision,
        cfg.training,
        cfg.optimizer,
        cfg.checkpoint,
    )
    m.validate()
    par.validate(m)
    prec.validate()
    if runtime:
        use_transformer_engine(prec)  # refuses TE / FP8 asked for without Transformer Engine
    if cfg.stages.patch_size > 1 and m.mtp_num_layers:
        raise ConfigError(
            "--patch-size > 1 cannot be combined with --mtp-num-layers (megatron's multi-token "
            "prediction is a different auxiliary loss); disable MTP or set --patch-size 1"
        )
    plan = make_plan(cfg, world_size)
    if runtime:  # resuming: the checkpoint's plan (or an explicit re-plan)
        plan = _resume_plan(cfg, world_size) or plan
    dp = par.data_parallel_size(world_size)
    for name in ("log_interval", "eval_interval", "eval_samples"):
        if getattr(tr, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if tr.eval_samples % (tr.micro_batch_size * dp):
        raise ConfigError(
            f"--eval-samples ({tr.eval_samples}) must be a multiple of --micro-batch-size x "
            f"data-parallel size ({tr.micro_batch_size} x {dp})"
        )
    if tr.recompute_method is not None and tr.recompute_granularity != "full":
        raise ConfigError("--recompute-method needs --recompute-granularity full")
    if tr.recompute_granularity == "full" and not tr.recompute_num_layers:
        raise ConfigError("--recompute-granularity full needs --recompute-num-layers (e.g. 1)")
    if opt.min_lr > opt.lr:
        raise ConfigError(f"--min-lr ({opt.min_lr}) must not exceed --lr ({opt.lr})")
    if opt.lr_warmup_iters < 0:
        raise ConfigError("--lr-warmup-iters must be >= 0")
    reset = cfg.stages.stage_boundary == "reset"
    for s in plan if reset else plan[:1]:
        steps = s.steps if reset else sum(p.steps for p in plan)
        if opt.lr_warmup_iters >= steps:
            raise ConfigError(
                f"--lr-warmup-iters ({opt.lr_warmup_iters}) must be shorter than the "
                f"{s.name if reset else 'whole'} stage ({steps} steps); lower it or raise "
                "--train-tokens"
            )
    if ck.save_interval is not None and ck.save_interval < 1:
        raise ConfigError("--save-interval must be >= 1 (or leave it unset)")
    if ck.keep_last is not None and ck.keep_last < 1:
        raise ConfigError("--keep-last must be >= 1 (or leave it unset)")
    if ck.load and runtime:
        from megapatch.training.checkpoint import find_latest, read_meta

        path = find_latest(ck.load, verify=True) or ck.load
        try:
            meta = read_meta(path)
        except Exception as err:
            raise ConfigError(f"--load {ck.load}: {err}") from err
        want = m.padded_vocab_size(par.tensor_model_parallel_size)
        have = meta.get("padded_vocab_size")
        if have is not None and have != want:
            raise ConfigError(
                f"--load {path}: its vocabulary is padded to {have} rows, this run pads to {want} "
                f"(--vocab-size {m.vocab_size}, --make-vocab-size-divisible-by "
                f"{m.make_vocab_size_divisible_by} x TP {par.tensor_model_parallel_size}); "
                f"re-pad it with megapatch convert reshard --tensor-model-parallel-size "
                f"{par.tensor_model_parallel_size}, or match the vocabulary flags"
            )
        saved = meta.get("model") or {}
        groups = saved.get("num_query_groups") or saved.get("num_attention_heads")
        saved = dict(saved, num_query_groups=groups) if saved else saved
        mine = dict(
            num_layers=m.num_layers,
            hidden_size=m.hidden_size,
            num_attention_heads=m.num_attention_heads,
            num_query_groups=m.num_query_groups or m.num_attention_heads,
        )
        for key, value in mine.items():
            if key in saved and saved[key] != value:
                raise ConfigError(
                    f"--load {path} has {key}={saved[key]}, this run --{key.replace('_', '-')} "
                    f"{value}; use the checkpoint's architecture (see megapatch ckpt info)"
                )
    if m.position_embedding_type == "learned_absolute":
        longest = max(s.positions for s in plan)
        if longest > m.max_position_embeddings:
            raise ConfigError(
                f"--max-position-embeddings ({m.max_position_embeddings}) is shorter than the "
                f"{longest} positions per sample of this plan"
            )
    _check_shapes(cfg, plan)
    if runtime:  # the data, the run directory and checkpoints live where the run will start
        _check_writable(cfg.run_dir, "--run-dir")
        if not ck.no_save:
            _check_writable(ck.save or os.path.join(cfg.run_dir, "checkpoints"), "--save")
        _validate_data(cfg)
    return plan


def _resume_plan(cfg: RunConfig, world_size: int) -> list[StagePlan] | None:
    """The plan a resume would follow, checked against the checkpoint's (resume.py)."""
    from megapatch.training.checkpoint import find_latest, read_meta
    from megapatch.training.resume import resolve

    if cfg.checkpoint.no_save:
        return None
    root = cfg.checkpoint.save or os.path.join(cfg.run_dir, "checkpoints")
    latest = find_latest(root, verify=True)
    if latest is None:
        return None
    return resolve(cfg, world_size, read_meta(latest), latest).plan


def _check_writable(path: str, flag: str) -> None:
    """``path`` is (or can be made) a writable directory; checked without writing anything."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag} {path} is a file, not a directory; move it or choose another")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{flag} {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{flag} {path} is not writable ({existing}: permission denied or a read-only "
            "file system); choose a writable location"
        )


def _check_shapes(cfg: RunConfig, plan: list[StagePlan]) -> None:
    """Every [positions x micro-batch] shape the run will use, at this layout: each stage's
    training samples, token-level validation (T positions) and, in a patch stage,
    patch-level validation (the patches that fit a validation window)."""
    from megapatch.training.evaluate import patch_eval_positions, position_alignment

    par, t = cfg.parallel, cfg.data.seq_length
    tp, sp = par.tensor_model_parallel_size, par.sequence_parallel
    fp8 = cfg.precision.fp8_format is not None
    align = position_alignment(tp, sp, fp8)
    why = " and ".join(
        [f"--tensor-model-parallel-size {tp} with --sequence-parallel"] * sp
        + ["--fp8-format (16 positions per GEMM)"] * fp8
    )
    shapes = [(f"the {s.name} stage's samples", s.positions) for s in plan]
    shapes.append(("token-level validation", t))
    for s in plan:
        if s.patch_size > 1:
            patches = patch_eval_positions(t, s.patch_size)
            shapes.append((f"patch-level validation (K={s.patch_size})", patches))
    for what, positions in shapes:
        if "patch-level validation" in what:
            usable = positions // align * align
            if usable < 1:
                raise ConfigError(
                    f"{what} fits {positions} patches in a window of --seq-length {t} tokens, "
                    f"fewer than the {align} that {why} needs; raise --seq-length or lower "
                    "--patch-size"
                )
        elif positions % align:
            raise ConfigError(
                f"{what} have {positions} positions, not a multiple of {align} as {why} needs; "
                "change --seq-length (patch positions are tokens / --patch-size), the layout or "
                "--micro-batch-size"
            )


def _validate_data(cfg: RunConfig) -> None:
    """The data files agree with each other and with the model's vocabulary (integrity.py)."""
    from megapatch.data.config import DataError
    from megapatch.data.integrity import check_prefix
    from megapatch.data.stream import parse_blend, read_meta

    if cfg.data.num_workers < 0:
        raise ConfigError("--num-workers must be >= 0")
    try:
        prefixes, _ = parse_blend(cfg.data.data_path)
        read_meta(prefixes)
        for prefix in prefixes:
            check_prefix(prefix, cfg.model.vocab_size)
    except DataError as err:
        raise ConfigError(str(err)) from err
