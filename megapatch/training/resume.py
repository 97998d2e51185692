"""Resuming: the checkpoint's plan is the plan, unless the user explicitly re-plans.

A checkpoint records the plan request that made its stage plan (``--train-tokens``,
``--global-batch-size``, ``--seq-length``, ``--patch-size``, ``--patch-fraction``,
``--patch-context``) and the data identity its samples refer to (``--data-path``, ``--split``,
``--seed``, ``--stream-chunk-length``, ``--shuffle-samples``). Resuming with other values would
silently re-read the stream with another geometry (tokens read twice or never), miss the
budget and leave the LR schedule at a wrong place, so it is refused, naming each changed flag.
The layout (TP/PP/DP, micro-batch size) may change freely: it does not change which samples a
step trains on.

``--replan`` asks for the change explicitly. The remaining budget is planned afresh from the
exact stream position reached, so no token is read twice or skipped:

* the stages done so far stay as they ran (a stage interrupted part-way is closed at the step
  reached); the new stages are laid on the stream right after them;
* the new request's budget counts the tokens already trained: the patch stage gets what is
  left of ``--patch-fraction`` x ``--train-tokens`` (none once token-level training began), the
  token stage the rest; both in whole steps of the new batch shape;
* each new stage starts like a stage after the switch (``--stage-boundary reset``: a fresh
  optimizer state and warmup + decay; ``continue``: one schedule over the new total);
* a stage interrupted part-way can only be closed exactly when its samples read so far are a
  stream prefix: with ``--shuffle-samples`` (the default) they are scattered over the stage, so
  such a re-plan is refused, naming the stage's next checkpoint (its end) to re-plan from.
  The data identity can never change within a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megapatch.config import ConfigError, RunConfig
from megapatch.training.plan import StagePlan, make_plan, stage_plans

PLAN_FLAGS = {
    "train_tokens": "--train-tokens",
    "global_batch_size": "--global-batch-size",
    "seq_length": "--seq-length",
    "patch_size": "--patch-size",
    "patch_fraction": "--patch-fraction",
    "patch_context": "--patch-context",
}
DATA_FLAGS = {
    "data_path": "--data-path",
    "split": "--split",
    "seed": "--seed",
    "stream_chunk_length": "--stream-chunk-length",
    "shuffle_samples": "--shuffle-samples",
}


def plan_request(cfg: RunConfig) -> dict[str, Any]:
    """The settings that determine the stage plan."""
    tr, st = cfg.training, cfg.stages
    return dict(
        train_tokens=tr.train_tokens,
        global_batch_size=tr.global_batch_size,
        seq_length=cfg.data.seq_length,
        patch_size=st.patch_size,
        patch_fraction=st.patch_fraction,
        patch_context=st.patch_context,
    )


def data_identity(cfg: RunConfig) -> dict[str, Any]:
    """The settings that determine which tokens a sample index refers to."""
    d = cfg.data
    return dict(
        data_path=list(d.data_path),
        split=d.split,
        seed=d.seed,
        stream_chunk_length=d.stream_chunk_length,
        shuffle_samples=d.shuffle_samples,
    )


@dataclass
class Resumed:
    """The plan a resumed run follows and how its saved state maps onto it."""

    plan: list[StagePlan]
    replanned: bool = False
    first_new_stage: int = 0  # with a re-plan: the index of the first new stage
    closed_stage_samples: int | None = None  # a stage closed part-way: its samples read
    note: str = ""


def _changes(now: dict, saved: dict, flags: dict) -> list[str]:
    return [
        f"{flags[k]} {now[k]!r} (checkpoint: {saved[k]!r})"
        for k in flags
        if k in saved and now[k] != saved[k]
    ]


def _saved_stages(meta: dict) -> list[tuple]:
    return [
        (s["name"], s["patch_size"], s["tokens_per_sample"], s["positions"], s["global_batch"],
         s["steps"])
        for s in meta["plan"]
    ]  # fmt: skip


def resolve(cfg: RunConfig, world_size: int, meta: dict | None, where: str = "") -> Resumed:
    """The plan of a run starting fresh (``meta`` None) or resuming from a checkpoint."""
    if meta is None:
        return Resumed(make_plan(cfg, world_size))
    request = plan_request(cfg)
    saved_request = meta.get("plan_request")
    if saved_request is None:  # checkpoints that predate the record: compare the plans
        fresh = [s.as_dict() for s in make_plan(cfg, world_size)]
        keys = ("name", "patch_size", "tokens_per_sample", "global_batch", "steps")
        same = [{k: s[k] for k in keys} for s in fresh] == [
            {k: s[k] for k in keys} for s in meta["plan"]
        ]
        saved_request = request if same else {}
    data_changes = _changes(data_identity(cfg), meta.get("data_identity", {}), DATA_FLAGS)
    if data_changes:
        raise ConfigError(
            f"resuming {where}: the data differs from the checkpoint's: "
            f"{'; '.join(data_changes)}. A run reads one token stream; resume with the "
            "checkpoint's data settings, or start a new run (another --run-dir)"
        )
    changes = _changes(request, saved_request, PLAN_FLAGS) if saved_request else ["the plan"]
    if not changes:
        return Resumed(stage_plans(_saved_stages(meta), cfg, world_size))
    if not cfg.checkpoint.replan:
        raise ConfigError(
            f"resuming {where}: the plan differs from the checkpoint's: {'; '.join(changes)}. "
            "Resume with the checkpoint's values, or pass --replan to re-plan the remaining "
            "tokens from where the run stands (see megapatch train --help)"
        )
    return _replan(cfg, world_size, meta, where)


def _replan(cfg: RunConfig, world: int, meta: dict, where: str) -> Resumed:
    state, stages = meta["state"], _saved_stages(meta)
    cur, done_steps = state["stage"], state["stage_step"]
    done = stages[:cur]
    closed = None
    if done_steps == stages[cur][5]:
        done.append(stages[cur])  # the checkpoint is at the end of its stage
    elif done_steps > 0:
        if meta.get("data_identity", {}).get("shuffle_samples", True):
            raise ConfigError(
                f"--replan {where}: the checkpoint is part-way through the {stages[cur][0]} "
                f"stage ({done_steps} of {stages[cur][5]} steps), whose samples are shuffled: "
                "the tokens read so far are not a stream prefix, so closing the stage here would "
                "skip some. Resume without --replan until the stage ends (step "
                f"{state['step'] - done_steps + stages[cur][5]}; its checkpoint is always "
                "written), then re-plan from there"
            )
        closed = state["consumed_samples"][cur]
        done.append((*stages[cur][:5], done_steps))
    done_tokens = sum(s[2] * s[4] * s[5] for s in done)
    patch_done = sum(s[2] * s[4] * s[5] for s in done if s[1] > 1)
    token_began = any(s[1] == 1 for s in done)
    fresh = make_plan(cfg, world)  # the new request as if from scratch (validates it)
    per_step = fresh[0].tokens_per_step
    total = cfg.training.train_tokens
    left = total - done_tokens
    if left < 0 or left % per_step:
        lo = done_tokens + max(left, 0) // per_step * per_step
        raise ConfigError(
            f"--replan {where}: {done_tokens:,} tokens are trained; --train-tokens {total:,} "
            f"must leave a whole number of steps of {per_step:,} tokens beyond them: use "
            f"{max(lo, done_tokens + per_step):,} (or {lo + per_step:,})"
        )
    want_patch = sum(s.tokens for s in fresh if s.patch_size > 1)
    patch_left = max(0, want_patch - patch_done) // per_step * per_step
    if patch_left and token_began:
        raise ConfigError(
            f"--replan {where}: token-level training has begun, a patch stage cannot follow it; "
            f"lower --patch-fraction to at most {patch_done / total:.4f}"
        )
    new = []
    if patch_left:
        p = next(s for s in fresh if s.patch_size > 1)
        new.append(("patch", p.patch_size, p.tokens_per_sample, p.positions, p.global_batch,
                    patch_left // per_step))  # fmt: skip
    if left - patch_left:
        t = cfg.data.seq_length
        new.append(("token", 1, t, t, per_step // t, (left - patch_left) // per_step))
    plan = stage_plans(done + new, cfg, world)
    note = (
        f"re-planned: {len(done)} stage(s) done ({done_tokens:,} tokens), "
        f"{len(new)} new stage(s) for the remaining {left:,} tokens"
    )
    return Resumed(plan, True, len(done), closed, note)
