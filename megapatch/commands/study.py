"""``megapatch study``: scaling-law studies of patch-level training.

  megapatch study plan SPEC.yaml --out DIR        expand the spec into DIR/manifest.jsonl
  megapatch study run DIR [--parallel P]          train the missing cells (restartable)
  megapatch study run DIR --backend slurm         one job array per resource shape
  megapatch study collect DIR [--import CSV]      DIR/results.jsonl and DIR/results.csv
  megapatch study fit | report | recommend DIR    scaling-law fits of the results

Bad input (a spec key, a cell that cannot be planned, a results table) is one error naming the
entry, exit code 2, before anything runs.
"""

from __future__ import annotations

import argparse
import sys

from megapatch.training.exit_codes import BAD_INPUT


def _guard(func):  # noqa: ANN001, ANN202
    def run(args: argparse.Namespace) -> int:
        from megapatch.study.spec import StudyError

        try:
            return int(func(args) or 0)
        except StudyError as err:
            print(f"error: {err}", file=sys.stderr)
            return BAD_INPUT

    return run


@_guard
def _plan(args: argparse.Namespace) -> int:
    from megapatch.study.manifest import plan_study

    plan_study(args.spec, args.out, calibration=args.calibration, parallel=args.parallel)
    return 0


@_guard
def _run(args: argparse.Namespace) -> int:
    if args.backend == "slurm":
        from megapatch.study.slurm import submit_study

        return submit_study(
            args.dir,
            parallel=args.parallel,
            only=args.only,
            python=args.python,
            dry_run=args.dry_run,
        )
    from megapatch.study.runner import LocalRunner

    if args.dry_run:
        print("error: --dry-run is for --backend slurm", file=sys.stderr)
        return BAD_INPUT
    runner = LocalRunner(
        args.dir,
        parallel=args.parallel,
        cores=args.cores,
        only=args.only,
        grace=args.grace,
        python=args.python,
    )
    return runner.run()


@_guard
def _collect(args: argparse.Namespace) -> int:
    from megapatch.study.collect import collect

    collect(args.dir, imports=args.imports)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``megapatch study`` with plan, run, collect (and fit, report, recommend)."""
    study = subparsers.add_parser(
        "study",
        help="scaling studies: plan, run, collect, fit, report, recommend",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = study.add_subparsers(dest="study_command", metavar="SUBCOMMAND")
    sub.required = True

    plan = sub.add_parser(
        "plan",
        help="expand a study spec into DIR/manifest.jsonl (re-planning keeps existing cells)",
        description="Expand a study spec (YAML) into one manifest row and one megapatch train "
        "recipe per cell, each validated and planned (tokens per stage, FLOPs, parameters). "
        "Re-planning an edited spec adds new cells and keeps every existing one under its id.",
    )
    plan.add_argument("spec", metavar="SPEC.yaml", help="the study spec (see studies/)")
    plan.add_argument("--out", required=True, metavar="DIR", help="the study directory")
    plan.add_argument(
        "--calibration",
        metavar="CALIB_DIR",
        default=None,
        help="a collected calibration study (same recipe, same machine): estimate each cell's "
        "minutes and the wall time (~: K other than 1 and 4, scaled from K=4)",
    )
    plan.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="P",
        help="with --calibration: cells at a time for the wall-time estimate (default: 1)",
    )
    plan.set_defaults(func=_plan)

    run = sub.add_parser(
        "run",
        help="train the missing cells (local subprocesses or a Slurm job array); restartable",
        description="Train every cell of DIR that is not finished. Restart the same command at "
        "any time: finished cells are skipped, started ones resume from their checkpoint. "
        "Exit code 0 all finished, 75 stopped by a signal (run again), 1 a cell failed, "
        "2 bad input.",
    )
    run.add_argument("dir", metavar="DIR", help="the study directory (planned)")
    run.add_argument(
        "--backend",
        choices=["local", "slurm"],
        default="local",
        help="local: megapatch train subprocesses on this machine; slurm: one job array per "
        "resource shape through slurm/pretrain_7b_patch.sh (default: local)",
    )
    run.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="P",
        help="cells at a time (local; Slurm: the array's %%P throttle) (default: 1)",
    )
    run.add_argument(
        "--cores",
        type=int,
        default=None,
        help="local: CPU cores to share between the P cells (default: all available)",
    )
    run.add_argument(
        "--only",
        nargs="+",
        metavar="GLOB",
        default=None,
        help="run only the cells whose id matches one of these shell patterns",
    )
    run.add_argument(
        "--grace",
        type=float,
        default=300.0,
        help="local: seconds a stopped trainer gets to write its checkpoint before SIGKILL "
        "(default: 300)",
    )
    run.add_argument(
        "--python",
        default=None,
        help="interpreter with megapatch for the trainers (default: this one)",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="slurm: write the array files and print the sbatch commands; submit nothing",
    )
    run.set_defaults(func=_run)

    col = sub.add_parser(
        "collect",
        help="results.jsonl/results.csv from the runs (and imported tables)",
        description="One row per run (the study results contract): status, N, D per stage, "
        "K, λ, FLOPs, wall time, device-hours, tokens/s per stage, final token-level "
        "validation loss on the shared held-out set. Byte-identical when run twice.",
    )
    col.add_argument("dir", metavar="DIR", help="the study directory")
    col.add_argument(
        "--import",
        dest="imports",
        action="append",
        metavar="CSV",
        default=[],
        help="add an external results table (columns method, params, D, val_loss; K, lam for "
        "patch rows); kept in DIR/imports/ for later collects. Repeatable.",
    )
    col.set_defaults(func=_collect)

    from megapatch.study import analysis_cli

    analysis_cli.register(sub)
