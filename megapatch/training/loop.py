"""``train(cfg)``: the two-stage run (patch level, then token level) on megatron-core.

The loop is short on purpose; it hands off to the stage plan (``plan.py``), the step
(``step.py``), checkpoints (``checkpoint.py``), validation (``evaluate.py``) and metrics
(``metrics.py``). Setup and validation that need no process group happen before any model or
data is built (``validate.py``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state

from megapatch.config import ConfigError, RunConfig
from megapatch.model import build_model, set_patch_size, transformer_config
from megapatch.runtime import distributed as D
from megapatch.runtime.signals import (
    ExitMonitor,
    fault_point,
    protect_checkpoint_writer,
    stop_signals_deferred,
)
from megapatch.training import checkpoint as C
from megapatch.training import exit_codes
from megapatch.training.evaluate import evaluate
from megapatch.training.flops import flops_per_step
from megapatch.training.metrics import (
    MetricsLogger,
    memory_gib,
    plot_validation,
    roll_back_records,
)
from megapatch.training.plan import StagePlan, format_plan
from megapatch.training.resume import data_identity, plan_request
from megapatch.training.resume import resolve as resolve_resume
from megapatch.training.run_dir import RunDirLock, prepare_run_dir, write_summary
from megapatch.training.step import (
    build_optimizer,
    build_scheduler,
    parameters_finite,
    train_step,
    wrap_with_ddp,
)
from megapatch.training.validate import validate_config


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint's megapatch.json."""

    step: int = 0  # optimizer steps over the whole run
    stage: int = 0  # index into the plan
    stage_step: int = 0  # steps done in the current stage
    tokens: int = 0  # input tokens consumed
    flops: float = 0.0  # training FLOPs spent
    elapsed: float = 0.0  # seconds of training steps (all sessions)
    consumed_samples: list[int] = field(default_factory=list)  # per stage
    stage_seconds: list[float] = field(default_factory=list)  # seconds of steps, per stage


class NonFiniteError(RuntimeError):
    """The run stopped on non-finite numbers (exit code 1); the message names the step."""


class _Timed:
    """An iterator that accumulates the time spent waiting for data."""

    def __init__(self, it) -> None:  # noqa: ANN001
        self.it, self.wait = it, 0.0

    def __iter__(self) -> _Timed:
        return self

    def __next__(self) -> dict:
        t0 = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.wait += time.perf_counter() - t0


class Trainer:
    """State and components of one run; ``run()`` is the loop."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        tr = cfg.training
        # First: a stop signal from here on ends the run cleanly (exit code 75).
        self.monitor = ExitMonitor(tr.exit_signal_handler, tr.exit_duration_in_mins)
        self.rank, self.world = D.init_process_group()
        self.is_main = self.rank == 0
        if not cfg.checkpoint.no_save:  # its helper process starts now, not under a save
            protect_checkpoint_writer()
        self.lock = RunDirLock.acquire_collective(cfg.run_dir)
        self.save_root = cfg.checkpoint.save or os.path.join(cfg.run_dir, "checkpoints")
        self.latest, self.latest_meta = self._find_resume_point()
        self.resumed = resolve_resume(cfg, self.world, self.latest_meta, self.latest or "")
        self.plan = self.resumed.plan
        outside = os.path.relpath(os.path.abspath(self.save_root), os.path.abspath(cfg.run_dir))
        self.save_lock = (  # a --save root outside the run directory: one run writes it
            RunDirLock.acquire_collective(self.save_root)
            if outside.startswith("..") and not cfg.checkpoint.no_save
            else None
        )
        D.initialize_model_parallel(cfg.parallel)
        D.set_random_seeds(cfg.data.seed)
        if self.is_main:
            self.meta = prepare_run_dir(cfg, self.plan, self.world)
        torch.distributed.barrier()
        self.data = self._build_data()  # before the model: data problems surface in seconds
        self.tcfg = transformer_config(cfg.model, cfg.parallel, cfg.precision)
        self.tcfg.recompute_granularity = tr.recompute_granularity
        self.tcfg.recompute_method = tr.recompute_method
        self.tcfg.recompute_num_layers = tr.recompute_num_layers
        chunks = build_model(
            cfg.model, cfg.parallel, cfg.precision, config=self.tcfg, init_seed=cfg.data.seed
        )
        self.padded_vocab = cfg.model.padded_vocab_size(cfg.parallel.tensor_model_parallel_size)
        opt = cfg.optimizer
        self.chunks = wrap_with_ddp(
            chunks,
            self.tcfg,
            use_distributed_optimizer=opt.use_distributed_optimizer,
            overlap_grad_reduce=opt.overlap_grad_reduce,
            overlap_param_gather=opt.overlap_param_gather,
        )
        n = len(self.plan)
        self.state = TrainState(consumed_samples=[0] * n, stage_seconds=[0.0] * n)
        self._new_optimizer(self.plan[0])
        self._resume_or_load()
        fault_point("setup", self.state.step)
        if self.is_main:  # steps after the resumed checkpoint are trained (and logged) again
            roll_back_records(os.path.join(cfg.run_dir, "metrics.jsonl"), self.state.step)
        self.logger = MetricsLogger(
            cfg.run_dir, cfg.logging, self.is_main, cfg.precision.fp8_format is not None
        )

    # ---------------------------------------------------------------- setup helpers
    def _new_optimizer(self, stage: StagePlan) -> None:
        from megatron.core.optimizer import OptimizerConfig

        o, prec = self.cfg.optimizer, self.cfg.precision
        self.optimizer = build_optimizer(
            self.chunks,
            OptimizerConfig(
                optimizer="adam",
                lr=o.lr,
                min_lr=o.min_lr,
                weight_decay=o.weight_decay,
                adam_beta1=o.adam_beta1,
                adam_beta2=o.adam_beta2,
                adam_eps=o.adam_eps,
                clip_grad=o.clip_grad,
                bf16=prec.bf16,
                params_dtype=torch.bfloat16 if prec.bf16 else torch.float32,
                use_distributed_optimizer=o.use_distributed_optimizer,
                overlap_param_gather=o.overlap_param_gather,
            ),
        )
        reset = self.cfg.stages.stage_boundary == "reset"
        steps = stage.steps if reset else sum(s.steps for s in self.plan)
        self.scheduler = build_scheduler(
            self.optimizer,
            lr=o.lr,
            min_lr=o.min_lr,
            warmup_steps=o.lr_warmup_iters,
            decay_steps=steps,
            decay_style=o.lr_decay_style,
            weight_decay=o.weight_decay,
            # A re-planned run's schedule is this config's; the checkpoint gives its position.
            override=self.resumed.replanned,
        )

    def _build_data(self):  # noqa: ANN202
        from megapatch.data.datasets import build_stage_datasets
        from megapatch.data.stages import StageSpec

        specs = [StageSpec(s.patch_size, s.tokens_per_sample, s.samples) for s in self.plan]
        return build_stage_datasets(
            self.cfg.data,
            specs,
            valid_samples=self.cfg.training.eval_samples,
            vocab_size=self.cfg.model.vocab_size,
        )

    def _loaders(self, stage: StagePlan) -> list[_Timed]:
        from megapatch.data.sampler import build_data_loader

        loaders = []
        for _ in self.chunks:
            loader = build_data_loader(
                self.data.train[stage.index],
                consumed_samples=self.state.consumed_samples[stage.index],
                micro_batch_size=stage.micro_batch_size,
                data_parallel_rank=parallel_state.get_data_parallel_rank(),
                data_parallel_size=parallel_state.get_data_parallel_world_size(),
                num_workers=self.cfg.data.num_workers,
            )
            # Workers start here: forked with the stop signals held, they never see one.
            with stop_signals_deferred():
                loaders.append(_Timed(iter(loader)))
        return loaders

    def _find_resume_point(self) -> tuple[str | None, dict | None]:
        """The newest whole checkpoint under the save root and its metadata (or None)."""
        say = (lambda msg: print(f"[resume] {msg}", flush=True)) if self.is_main else None
        latest = C.find_latest(self.save_root, report=say, verify=True)
        if latest is None and C.list_checkpoints(self.save_root):
            raise ConfigError(
                f"no whole checkpoint under {self.save_root} (every one is damaged: see above); "
                "move them elsewhere to start afresh, or repair them"
            )
        return latest, (C.read_meta(latest) if latest else None)

    def _resume_or_load(self) -> None:
        latest, meta = self.latest, self.latest_meta
        if latest is not None:
            if meta.get("model_only"):
                raise ConfigError(
                    f"{latest} holds weights only (an import or a reshard without optimizer); "
                    "start from it with --load, and keep --save for the new run's checkpoints"
                )
            stage = self.plan[meta["stage"]]
            if meta["stage"] > 0 and self.cfg.stages.stage_boundary == "reset":
                self._new_optimizer(stage)  # its scheduler covers this stage
            C.load_checkpoint(
                latest,
                self.chunks,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                with_rng=meta.get("world_size") == self.world,
            )
            state = dict(meta["state"])
            state.setdefault("stage_seconds", [0.0] * len(meta["state"]["consumed_samples"]))
            self.state = TrainState(**state)
            if self.resumed.replanned:  # the new stages follow the ones done
                st, first = self.state, self.resumed.first_new_stage
                extra = len(self.plan) - first
                st.consumed_samples = st.consumed_samples[:first] + [0] * extra
                if self.resumed.closed_stage_samples is not None:
                    st.consumed_samples[first - 1] = self.resumed.closed_stage_samples
                st.stage_seconds = st.stage_seconds[:first] + [0.0] * extra
                st.stage, st.stage_step = first, 0
            if self.is_main:
                print(
                    f"[resume] {latest}: step {self.state.step}, stage {stage.name}, "
                    f"{self.state.tokens:,} tokens seen"
                    + (f"; {self.resumed.note}" if self.resumed.replanned else "")
                )
        elif self.cfg.checkpoint.load:
            path = C.find_latest(self.cfg.checkpoint.load) or self.cfg.checkpoint.load
            C.load_checkpoint(path, self.chunks)
            if self.is_main:
                print(f"[load] weights from {path}; fresh optimizer and schedule")

    def save(self) -> None:
        """A complete checkpoint of the current state (collective); never of non-finite
        weights."""
        step = self.state.step
        if self.cfg.checkpoint.no_save:
            return
        if not parameters_finite(self.chunks):
            raise NonFiniteError(
                f"step {step}: the weights are not finite; no checkpoint written (the latest, "
                f"{C.find_latest(self.save_root) or 'none yet'}, is kept)"
            )
        meta = dict(
            self.meta_common(),
            state=dataclasses.asdict(self.state),
            stage=self.state.stage,
            patch_size=self.plan[self.state.stage].patch_size,
            tokens_seen=self.state.tokens,
            consumed_samples=self.state.consumed_samples,
        )
        C.save_checkpoint(
            self.save_root,
            self.state.step,
            self.chunks,
            meta,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            keep_last=self.cfg.checkpoint.keep_last,
            hook=lambda _where: fault_point("save", step),
        )

    def meta_common(self) -> dict:
        """What every checkpoint records besides the state."""
        cfg = self.cfg
        return dict(
            model=dataclasses.asdict(cfg.model),
            parallel=dataclasses.asdict(cfg.parallel),
            precision=dataclasses.asdict(cfg.precision),
            padded_vocab_size=self.padded_vocab,
            tokenizer_model=getattr(self, "meta", {}).get("tokenizer_model"),
            add_bos_token=getattr(self, "meta", {}).get("add_bos_token", False),
            git_commit=getattr(self, "meta", {}).get("git_commit"),
            world_size=self.world,
            plan=[s.as_dict() for s in self.plan],
            plan_request=plan_request(cfg),
            data_identity=data_identity(cfg),
            replans=(getattr(self, "latest_meta", None) or {}).get("replans", [])
            + (
                [dict(step=self.latest_meta["step"], before=self.latest_meta.get("plan_request"))]
                if getattr(self, "resumed", None) is not None and self.resumed.replanned
                else []
            ),
        )

    # ---------------------------------------------------------------- the loop
    def run(self) -> dict:
        """Train every remaining stage; returns a summary (identical on all ranks)."""
        cfg, st = self.cfg, self.state
        final: dict = {}
        last_eval_step = -1
        if self.monitor.should_exit():  # stopped while setting up: the latest checkpoint stands
            return self._stop(saved=False)
        while True:
            sp = self.plan[st.stage]
            if st.stage_step >= sp.steps:  # stage done (or resumed exactly at its end)
                if st.stage == len(self.plan) - 1:
                    break
                st.stage, st.stage_step = st.stage + 1, 0
                continue
            if st.stage_step == 0 and st.stage > 0 and cfg.stages.stage_boundary == "reset":
                self._new_optimizer(sp)  # the paper: new optimizer state, new warmup + cosine
            set_patch_size(self.chunks, sp.patch_size)
            loaders = self._loaders(sp)
            step_flops = flops_per_step(cfg.model, sp.global_batch, sp.positions, self.padded_vocab)
            t_win = time.perf_counter()
            while st.stage_step < sp.steps:
                fault_point("step", st.step + 1)
                res = train_step(
                    self.chunks,
                    self.optimizer,
                    loaders,
                    num_microbatches=sp.num_microbatches,
                    micro_batch_size=sp.micro_batch_size,
                    seq_positions=sp.positions,
                    check_finite=cfg.training.check_for_nan_in_loss_and_grad,
                )
                if res.update_successful:
                    self.scheduler.step(increment=1)
                st.step += 1
                st.stage_step += 1
                st.tokens += sp.tokens_per_step
                st.flops += step_flops
                st.consumed_samples[sp.index] += sp.global_batch
                now = time.perf_counter()
                st.elapsed += now - t_win
                st.stage_seconds[sp.index] += now - t_win
                self._log_train(
                    sp,
                    res,
                    now - t_win,
                    loaders,
                    step_flops,
                    print_line=(
                        st.step % cfg.training.log_interval == 0 or st.stage_step == sp.steps
                    ),
                )
                self._check_finite(res, st.step)
                fault_point("end", st.step)
                if st.step % cfg.training.eval_interval == 0:
                    fault_point("eval", st.step)
                    final = self._evaluate(sp)
                    last_eval_step = st.step
                at_boundary = st.stage_step == sp.steps and st.stage < len(self.plan) - 1
                interval = cfg.checkpoint.save_interval
                saved = False
                if at_boundary:
                    fault_point("boundary", st.step)
                if at_boundary or (interval and st.step % interval == 0):
                    self.save()
                    saved = True
                # After the save: a signal that arrived during the step, the evaluation or the
                # save itself stops the run here, with this step's checkpoint.
                ei = cfg.training.exit_interval
                if self.monitor.should_exit() or bool(ei and st.step % ei == 0):
                    if not self.monitor.reason:
                        self.monitor.reason = f"--exit-interval {ei}"
                    return self._stop(saved=saved)
                t_win = time.perf_counter()
        if last_eval_step != st.step:
            final = self._evaluate(self.plan[-1])
        last = C.find_latest(self.save_root)
        if not cfg.checkpoint.no_save and (
            last is None or not last.endswith(C.checkpoint_name(st.step))
        ):
            self.save()
        self.logger.close()
        if self.is_main and cfg.logging.plot:
            metrics = os.path.join(cfg.run_dir, "metrics.jsonl")
            plot_validation(
                {os.path.basename(cfg.run_dir.rstrip("/")): metrics},
                os.path.join(cfg.run_dir, "val_loss.png"),
            )
        return self._summary(exit_codes.FINISHED, final)

    def _check_finite(self, res, step: int) -> None:  # noqa: ANN001
        """Apply --nonfinite-action to a step whose update was skipped as non-finite."""
        tr = self.cfg.training
        if res.finite:
            self.nonfinite_run = 0
            return
        self.nonfinite_run = getattr(self, "nonfinite_run", 0) + 1
        what = f"loss {res.loss}, gradient norm {res.grad_norm}"
        latest = C.find_latest(self.save_root) or "none yet"
        if tr.nonfinite_action == "stop" or self.nonfinite_run >= tr.max_nonfinite_steps:
            why = (
                "--nonfinite-action stop"
                if tr.nonfinite_action == "stop"
                else f"{self.nonfinite_run} consecutive non-finite steps (--max-nonfinite-steps)"
            )
            raise NonFiniteError(
                f"step {step}: {what}; stopping ({why}). The weights were not updated by these "
                f"steps and the latest checkpoint ({latest}) is finite: lower --lr, check the "
                "data, then resume (or --load it)"
            )
        if self.is_main:
            print(
                f"[nonfinite] step {step}: {what}; update skipped ({self.nonfinite_run} in a "
                f"row, stopping at {tr.max_nonfinite_steps})",
                flush=True,
            )

    def _stop(self, saved: bool) -> dict:
        """Stop early with a complete checkpoint of the last finished step (exit code 75)."""
        st = self.state
        if not saved and not self.cfg.checkpoint.no_save:
            last = C.find_latest(self.save_root)
            if st.step > 0 and (last is None or not last.endswith(C.checkpoint_name(st.step))):
                self.save()
        if self.is_main:
            print(
                f"[exit] {self.monitor.reason or 'stop requested'}: checkpoint of step {st.step} "
                f"is complete; run the same command again to continue (exit code "
                f"{exit_codes.STOPPED})",
                flush=True,
            )
        self.logger.close()
        return self._summary(exit_codes.STOPPED, {})

    def _summary(self, code: int, final: dict) -> dict:
        """The run's summary (also RUN_DIR/run_summary.json, written by rank 0)."""
        st = self.state
        summary = dict(
            status=exit_codes.NAMES[code],
            exit_code=code,
            exited=code == exit_codes.STOPPED,
            step=st.step,
            tokens=st.tokens,
            flops=st.flops,
            seconds=st.elapsed,
            stage_seconds=_by_name(self.plan, lambda s: st.stage_seconds[s.index]),
            stage_tokens=_by_name(
                self.plan, lambda s: st.consumed_samples[s.index] * s.tokens_per_sample
            ),
            val_loss=final.get("val_loss"),
            val_ppl=final.get("val_ppl"),
            world_size=self.world,
            git_commit=getattr(self, "meta", {}).get("git_commit"),
            plan=[s.as_dict() for s in self.plan],
        )
        if self.is_main:
            write_summary(self.cfg.run_dir, summary)
        torch.distributed.barrier()  # every rank leaves together, with the summary written
        return summary

    def _log_train(self, sp, res, seconds, loaders, step_flops, print_line) -> None:  # noqa: ANN001
        wait = sum(it.wait for it in loaders)
        for it in loaders:
            it.wait = 0.0
        lr = self.optimizer.param_groups[0]["lr"]
        self.logger.train(
            dict(
                step=self.state.step,
                stage=sp.name,
                patch_size=sp.patch_size,
                loss=res.loss,
                lr=lr,
                grad_norm=res.grad_norm,
                skipped=not res.update_successful,
                tokens=self.state.tokens,
                flops=self.state.flops,
                step_seconds=seconds,
                tokens_per_s=sp.tokens_per_step / seconds,
                positions_per_s=sp.global_batch * sp.positions / seconds,
                tflops_per_gpu=step_flops / seconds / self.world / 1e12,
                memory_gib=memory_gib(),
                data_wait=min(1.0, wait / seconds),
            ),
            print_line,
        )

    def _evaluate(self, sp: StagePlan) -> dict:
        res = evaluate(self.chunks, self.data.valid, sp.micro_batch_size, sp.patch_size)
        self.logger.eval(
            dict(
                step=self.state.step,
                stage=sp.name,
                tokens=self.state.tokens,
                flops=self.state.flops,
                **res,
            )
        )
        return res


def _by_name(plan: list[StagePlan], value) -> dict:  # noqa: ANN001
    """Per stage kind ("patch", "token"): a re-planned run may have several of a kind."""
    out: dict = {}
    for s in plan:
        out[s.name] = out.get(s.name, 0) + value(s)
    return out


def train(cfg: RunConfig, dry_run: bool = False) -> dict:
    """Validate, print the plan, train. ``dry_run``: print the plan (with the memory and time
    projection of ``megapatch plan``) and return; it plans for any machine (no TE check)."""
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    if dry_run:
        from megapatch.commands.plan import build_report, print_report

        report = print_report(cfg, world) if rank == 0 else build_report(cfg, world)
        return dict(plan=report["stages"], report=report)
    plan = validate_config(cfg, world)
    if rank == 0:
        print(format_plan(plan, world))
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        for lock in (trainer.lock, trainer.save_lock):
            if lock is not None:
                lock.release()
