"""``megapatch train``: the two-stage run (patch level, then token level), resumable.

Launch one process per GPU (torchrun or srun); on a CPU machine a single process runs on gloo.
Every config field is a Megatron-style flag; ``--config`` reads a YAML recipe (examples/)
that flags override. The resolved config, the git commit and the plan are written into the run
directory; ``--dry-run`` prints the plan and exits.

Exit codes: 0 finished; 75 stopped early with a complete checkpoint (SIGTERM/SIGUSR1, time
limit, --exit-interval: run the same command again to continue); 1 failed; 2 bad input.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from megapatch.config import ConfigError, add_run_arguments, config_from_args


def run(args: argparse.Namespace) -> int:
    """Parse the config, validate it, train."""
    from megapatch.runtime.signals import catch_stop_signals_early

    catch_stop_signals_early()  # before the heavy imports below
    from megapatch.training import exit_codes
    from megapatch.training.checkpoint import CheckpointError
    from megapatch.training.loop import NonFiniteError, train

    try:
        cfg = config_from_args(args)
        summary = train(cfg, dry_run=args.dry_run)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    except (NonFiniteError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_codes.FAILED
    finally:
        # The run is over (its checkpoint and summary written): a stop signal arriving while
        # the interpreter shuts down must not turn the exit code into "killed".
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
    if args.dry_run:
        return exit_codes.FINISHED
    rank0 = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0
    if summary["exit_code"] == exit_codes.STOPPED:
        # The checkpoint and the summary are complete on every rank: leave at once, without
        # the interpreter's teardown (it can take longer than a scheduler's KillWait).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_codes.STOPPED)
    if summary["exit_code"] == exit_codes.FINISHED and rank0:
        print(
            f"done: {summary['step']} steps, {summary['tokens']:,} tokens, "
            f"final token-level val loss {summary['val_loss']:.4f} (ppl {summary['val_ppl']:.2f})"
        )
    return summary["exit_code"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``megapatch train``."""
    p = subparsers.add_parser(
        "train",
        help="two-stage patch-level training on megatron-core (resumable)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="Print the plan (stages, per-GPU memory, projected time on H100s, as megapatch plan "
        "does for WORLD_SIZE ranks) and exit; no GPU or Transformer Engine needed.",
    )
    add_run_arguments(p)
    p.set_defaults(func=run)
