"""The stage plan: how a token budget becomes a patch stage and a token stage.

Given the budget N (input tokens), λ, K, T and the token-stage global batch B:

* every step of both stages consumes the same number of tokens, B·T;
* the patch stage runs ``round(λ · N / (B·T))`` steps of B/K samples of K·T tokens (T patch
  positions each; the paper's choice, ``--patch-context KT``), or of B samples of T tokens
  (T/K patches, ``--patch-context T``);
* the token stage runs the remaining steps of B samples of T tokens;
* so the run consumes exactly N tokens (N must be a whole number of steps).

Each stage also gets its micro-batch count per data-parallel rank and its pipeline-bubble
fraction; layouts that cannot work are refused here, before anything is built.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megapatch.config import ConfigError, RunConfig


@dataclass(frozen=True)
class StagePlan:
    """One stage of the run."""

    index: int
    name: str  # "patch" or "token"
    patch_size: int  # K (1 in the token stage)
    tokens_per_sample: int  # input tokens per sample (K*T, or T)
    positions: int  # model positions per sample (tokens / K)
    global_batch: int  # samples per step
    micro_batch_size: int
    num_microbatches: int  # per data-parallel rank and step
    steps: int
    bubble_fraction: float  # pipeline idle share of a step (0 without PP)

    @property
    def tokens_per_step(self) -> int:
        """Input tokens consumed per optimizer step."""
        return self.global_batch * self.tokens_per_sample

    @property
    def tokens(self) -> int:
        """Input tokens consumed by the whole stage."""
        return self.steps * self.tokens_per_step

    @property
    def samples(self) -> int:
        """Samples consumed by the whole stage."""
        return self.steps * self.global_batch

    def as_dict(self) -> dict:
        """JSON-friendly view, derived quantities included."""
        return dict(asdict(self), tokens_per_step=self.tokens_per_step, tokens=self.tokens)


# The patch share a plan may deviate from --patch-fraction by (rounding to whole steps).
LAMBDA_TOLERANCE = 0.05


def patch_share(plan: list[StagePlan]) -> float:
    """λ achieved: the share of the run's tokens trained at patch level."""
    total = sum(s.tokens for s in plan)
    return sum(s.tokens for s in plan if s.patch_size > 1) / max(total, 1)


def _bubble(pp: int, vpp: int | None, microbatches: int) -> float:
    """Idle fraction of 1F1B (interleaved with v chunks): (p-1) / (v*m + p-1)."""
    if pp == 1:
        return 0.0
    v = vpp or 1
    return (pp - 1) / (v * microbatches + pp - 1)


def make_plan(cfg: RunConfig, world_size: int) -> list[StagePlan]:
    """The stages of ``cfg`` on ``world_size`` ranks (stages with 0 steps are left out)."""
    tr, st, par = cfg.training, cfg.stages, cfg.parallel
    k, lam, t = st.patch_size, st.patch_fraction, cfg.data.seq_length
    b, mbs = tr.global_batch_size, tr.micro_batch_size
    if k < 1:
        raise ConfigError(f"--patch-size must be >= 1, got {k}")
    if not 0.0 <= lam <= 1.0:
        raise ConfigError(f"--patch-fraction must lie in [0, 1], got {lam}")
    if min(t, b, mbs, tr.train_tokens) < 1:
        raise ConfigError(
            "--seq-length, --global-batch-size, --micro-batch-size and --train-tokens must be >= 1"
        )
    par.data_parallel_size(world_size)  # validates the layout
    per_step = b * t
    if tr.train_tokens % per_step:
        lo = tr.train_tokens // per_step * per_step
        raise ConfigError(
            f"--train-tokens {tr.train_tokens} is not a whole number of steps of "
            f"--global-batch-size x --seq-length = {per_step} tokens; use {lo or per_step} or "
            f"{lo + per_step}"
        )
    total_steps = tr.train_tokens // per_step
    patch_steps = round(lam * total_steps) if k > 1 else 0
    achieved = patch_steps / total_steps
    if k > 1 and 0 < lam and patch_steps == 0:
        raise ConfigError(
            f"--patch-fraction {lam} of {total_steps} steps rounds to no patch step; raise "
            "--train-tokens or --patch-fraction"
        )
    if k > 1 and abs(achieved - lam) > LAMBDA_TOLERANCE:
        raise ConfigError(
            f"--patch-fraction {lam:.4g} is not reachable in whole steps: {total_steps} step(s) "
            f"of {per_step:,} tokens give {patch_steps} patch-level step(s), a patch share of "
            f"{achieved:.3f}; raise --train-tokens or lower --global-batch-size (or ask for "
            f"--patch-fraction {achieved:.4g})"
        )
    stages = []
    if patch_steps:
        if st.patch_context == "KT":
            if b % k:
                raise ConfigError(
                    f"--global-batch-size {b} must be divisible by --patch-size {k}: the patch "
                    f"stage runs B/K samples of K*T tokens (or use --patch-context T)"
                )
            shape = (k * t, t, b // k)
        else:
            if t % k:
                raise ConfigError(
                    f"--seq-length {t} must be divisible by --patch-size {k} with "
                    "--patch-context T (samples of T tokens = T/K patches)"
                )
            shape = (t, t // k, b)
        stages.append(("patch", k, *shape, patch_steps))
    if total_steps - patch_steps:
        stages.append(("token", 1, t, t, b, total_steps - patch_steps))
    return stage_plans(stages, cfg, world_size)


def stage_plans(stages: list[tuple], cfg: RunConfig, world_size: int) -> list[StagePlan]:
    """StagePlans of ``(name, K, tokens/sample, positions, samples/step, steps)`` stages, with
    their micro-batching and bubble at this layout (a resumed run may change the layout)."""
    tr, par = cfg.training, cfg.parallel
    mbs, dp = tr.micro_batch_size, par.data_parallel_size(world_size)
    plan = []
    for i, (name, kk, tokens, positions, gb, steps) in enumerate(stages):
        if gb % (mbs * dp):
            raise ConfigError(
                f"the {name} stage's global batch of {gb} samples is not divisible by "
                f"--micro-batch-size ({mbs}) x data-parallel size ({dp}); change "
                "--global-batch-size, --micro-batch-size or the layout"
            )
        m = gb // (mbs * dp)
        pp, vpp = par.pipeline_model_parallel_size, par.virtual_pipeline_model_parallel_size
        if vpp and m % pp:
            raise ConfigError(
                f"interleaved pipelining needs the {name} stage's micro-batches per step ({m}) "
                f"to be a multiple of --pipeline-model-parallel-size ({pp})"
            )
        plan.append(
            StagePlan(i, name, kk, tokens, positions, gb, mbs, m, steps, _bubble(pp, vpp, m))
        )
    return plan


def format_plan(plan: list[StagePlan], world_size: int) -> str:
    """A table of the plan for stdout and --dry-run."""
    head = (
        f"{'stage':6} {'K':>2} {'tokens/sample':>13} {'positions':>9} {'samples/step':>12} "
        f"{'tokens/step':>11} {'steps':>7} {'tokens':>13} {'micro-batches':>13} {'bubble':>7}"
    )
    lines = [f"stage plan on {world_size} rank(s)", head]
    for s in plan:
        lines.append(
            f"{s.name:6} {s.patch_size:2d} {s.tokens_per_sample:13d} {s.positions:9d} "
            f"{s.global_batch:12d} {s.tokens_per_step:11d} {s.steps:7d} {s.tokens:13,d} "
            f"{s.num_microbatches:13d} {s.bubble_fraction:7.1%}"
        )
    total = sum(s.tokens for s in plan)
    cost = sum(s.tokens / s.patch_size for s in plan) / max(total, 1)
    lines.append(
        f"total {total:,} tokens; patch share λ = {patch_share(plan):.3f}; "
        f"compute {cost:.3f}x of token-level training"
    )
    return "\n".join(lines)
