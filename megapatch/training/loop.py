"""``train(cfg)``: the two-stage run (patch level, then token level) on megatron-core.

The loop is short on purpose; it hands off to the stage plan (``plan.py``), the step
(``step.py``), checkpoints (``checkpoint.py``), validation (``evaluate.py``) and metrics
(``metrics.py``). Setup and validation that need no process group happen before any model or
data is built (``validate.py``).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state

from megapatch.config import ConfigError, RunConfig
from megapatch.model import build_model, set_patch_size, transformer_config
from megapatch.runtime import distributed as D
from megapatch.training import checkpoint as C
from megapatch.training.evaluate import evaluate
from megapatch.training.flops import flops_per_step
from megapatch.training.metrics import MetricsLogger, memory_gib, plot_validation
from megapatch.training.plan import StagePlan, format_plan, make_plan
from megapatch.training.run_dir import prepare_run_dir
from megapatch.training.step import build_optimizer, build_scheduler, train_step, wrap_with_ddp
from megapatch.training.validate import validate_config

FAULT_ENV = "MEGAPATCH_FAULT_AT_STEP"  # tests: SIGKILL this process after that global step


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint's megapatch.json."""

    step: int = 0  # optimizer steps over the whole run
    stage: int = 0  # index into the plan
    stage_step: int = 0  # steps done in the current stage
    tokens: int = 0  # input tokens consumed
    flops: float = 0.0  # training FLOPs spent
    elapsed: float = 0.0  # seconds of training (all sessions)
    consumed_samples: list[int] = field(default_factory=list)  # per stage


class ExitMonitor:
    """SIGTERM/SIGUSR1 and a wall-clock limit, agreed on by every rank."""

    def __init__(self, handle_signals: bool, limit_min: float | None) -> None:
        self.flag = False
        self.deadline = time.monotonic() + 60 * limit_min if limit_min else None
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.flag = True
        self.reason = signal.Signals(signum).name

    def should_exit(self) -> bool:
        """True on every rank as soon as one rank got a signal or the time is up."""
        hit = self.flag or (self.deadline is not None and time.monotonic() > self.deadline)
        t = torch.tensor([1.0 if hit else 0.0])
        if torch.cuda.is_available():
            t = t.cuda()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())


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
        self.rank, self.world = D.init_process_group()
        self.plan = make_plan(cfg, self.world)
        D.initialize_model_parallel(cfg.parallel)
        D.set_random_seeds(cfg.data.seed)
        self.is_main = self.rank == 0
        self.save_root = cfg.checkpoint.save or os.path.join(cfg.run_dir, "checkpoints")
        if self.is_main:
            self.meta = prepare_run_dir(cfg, self.plan, self.world)
        torch.distributed.barrier()
        self.tcfg = transformer_config(cfg.model, cfg.parallel, cfg.precision)
        tr = cfg.training
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
        self.state = TrainState(consumed_samples=[0] * len(self.plan))
        self._new_optimizer(self.plan[0])
        self.data = self._build_data()
        self.logger = MetricsLogger(
            cfg.run_dir, cfg.logging, self.is_main, cfg.precision.fp8_format is not None
        )
        self.monitor = ExitMonitor(tr.exit_signal_handler, tr.exit_duration_in_mins)
        self._resume_or_load()

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
        )

    def _build_data(self):  # noqa: ANN202
        from megapatch.data.datasets import build_stage_datasets
        from megapatch.data.stages import StageSpec

        specs = [StageSpec(s.patch_size, s.tokens_per_sample, s.samples) for s in self.plan]
        return build_stage_datasets(
            self.cfg.data, specs, valid_samples=self.cfg.training.eval_samples
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
            loaders.append(_Timed(iter(loader)))
        return loaders

    def _resume_or_load(self) -> None:
        latest = C.find_latest(self.save_root)
        if latest is not None:
            meta = C.read_meta(latest)
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
            self.state = TrainState(**meta["state"])
            if self.is_main:
                print(
                    f"[resume] {latest}: step {self.state.step}, stage {stage.name}, "
                    f"{self.state.tokens:,} tokens seen"
                )
        elif self.cfg.checkpoint.load:
            path = C.find_latest(self.cfg.checkpoint.load) or self.cfg.checkpoint.load
            C.load_checkpoint(path, self.chunks)
            if self.is_main:
                print(f"[load] weights from {path}; fresh optimizer and schedule")

    def save(self) -> None:
        """A complete checkpoint of the current state (collective)."""
        if self.cfg.checkpoint.no_save:
            return
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
        )

    # ---------------------------------------------------------------- the loop
    def run(self) -> dict:
        """Train every remaining stage; returns a summary (identical on all ranks)."""
        cfg, st = self.cfg, self.state
        stage_seconds: dict[str, float] = {}
        stage_tokens: dict[str, int] = {}
        last_eval_step = -1
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
            t_stage, window, t_win = time.perf_counter(), [], time.perf_counter()
            tokens_at_start = st.tokens
            while st.stage_step < sp.steps:
                res = train_step(
                    self.chunks,
                    self.optimizer,
                    loaders,
                    num_microbatches=sp.num_microbatches,
                    micro_batch_size=sp.micro_batch_size,
                    seq_positions=sp.positions,
                )
                if res.update_successful:
                    self.scheduler.step(increment=1)
                st.step += 1
                st.stage_step += 1
                st.tokens += sp.tokens_per_step
                st.flops += step_flops
                st.consumed_samples[sp.index] += sp.global_batch
                window.append(res)
                now = time.perf_counter()
                st.elapsed += now - t_win
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
                t_win = now
                if os.environ.get(FAULT_ENV) == str(st.step):
                    os.kill(os.getpid(), signal.SIGKILL)
                if st.step % cfg.training.eval_interval == 0:
                    final = self._evaluate(sp)
                    last_eval_step = st.step
                at_boundary = st.stage_step == sp.steps and st.stage < len(self.plan) - 1
                interval = cfg.checkpoint.save_interval
                due = bool(interval) and st.step % interval == 0
                ei = cfg.training.exit_interval
                exiting = self.monitor.should_exit() or bool(ei and st.step % ei == 0)
                if due or at_boundary or exiting:
                    self.save()
                if exiting:
                    if self.is_main:
                        print(f"[exit] checkpoint saved at step {st.step}; exiting cleanly")
                    self.logger.close()
                    return dict(exited=True, step=st.step)
                t_win = time.perf_counter()
            stage_seconds[sp.name] = time.perf_counter() - t_stage
            stage_tokens[sp.name] = st.tokens - tokens_at_start
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
        return dict(
            exited=False,
            step=st.step,
            tokens=st.tokens,
            flops=st.flops,
            seconds=st.elapsed,
            stage_seconds=stage_seconds,
            stage_tokens=stage_tokens,
            **final,
        )

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


def train(cfg: RunConfig, dry_run: bool = False) -> dict:
    """Validate, print the plan, train. ``dry_run``: print the plan and return."""
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    plan = validate_config(cfg, world)
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    if rank == 0:
        print(format_plan(plan, world))
    if dry_run:
        return dict(plan=[s.as_dict() for s in plan])
    trainer = Trainer(cfg)
    return trainer.run()
