"""``megapatch study fit | report | recommend``: scaling-law fits of a study's results.

``register(subparsers)`` adds the three sub-commands to the ``megapatch study`` sub-parsers (the
``study`` command itself, with ``plan``, ``run`` and ``collect``, lives in its own module and
calls this). Each sub-command reads ``DIR/results.jsonl`` (or ``DIR/results.csv``) as written by
``megapatch study collect`` and returns an exit code: 0 on success, 2 for bad input (a missing
column, a non-finite loss, too few runs for a method, an unknown method group, ...), with one
message naming the entry and the fix.

The heavy modules (numpy, scipy, matplotlib) are imported only when a sub-command runs.
"""

from __future__ import annotations

import argparse
import sys

from megapatch.training.exit_codes import BAD_INPUT

DEFAULT_BOOTSTRAP = 1000


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _bootstrap_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 (no intervals) or more, got {value}")
    return value


def _run_guarded(func: object, args: argparse.Namespace) -> int:
    """Run a sub-command; bad input becomes one ``error:`` line and exit code 2."""
    from megapatch.study.fit import StudyInputError

    try:
        return int(func(args) or 0)  # type: ignore[operator]
    except StudyInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BAD_INPUT


def _fit(args: argparse.Namespace) -> int:
    from megapatch.study.fit import run_fit_command

    return _run_guarded(run_fit_command, args)


def _report(args: argparse.Namespace) -> int:
    from megapatch.study.report import run_report_command

    return _run_guarded(run_report_command, args)


def _recommend(args: argparse.Namespace) -> int:
    from megapatch.study.recommend import run_recommend_command

    return _run_guarded(run_recommend_command, args)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``fit``, ``report`` and ``recommend`` to the ``megapatch study`` sub-parsers."""
    fit = subparsers.add_parser(
        "fit",
        help="fit L(N, D) = E + A/N^alpha + B/D^beta per method, with bootstrap intervals "
        "and compute multipliers (writes DIR/fit.json)",
        description="Fit L(N, D) = E + A/N^alpha + B/D^beta to the finished runs of each method "
        "(token level; each patch (K, lambda) group with enough runs): Huber loss (delta 1e-3) "
        "on log loss summed over runs, L-BFGS-B from a grid of starts, a variable-projection "
        "cross-check, bootstrap percentile intervals over runs, and the compute multiplier of "
        "each patch method against the token-level fit (per run and along the compute-optimal "
        "frontier). Writes DIR/fit.json (byte-identical for a fixed --seed).",
    )
    fit.add_argument("dir", metavar="DIR", help="study directory with results.jsonl/.csv")
    fit.add_argument(
        "--shared-e",
        action="store_true",
        help="one irreducible loss E shared by all methods (a joint fit); default: E per method",
    )
    fit.add_argument(
        "--bootstrap",
        type=_bootstrap_count,
        default=DEFAULT_BOOTSTRAP,
        metavar="N",
        help=f"bootstrap resamples over runs for the intervals (default {DEFAULT_BOOTSTRAP}; "
        "0: no intervals)",
    )
    fit.add_argument(
        "--seed", type=int, default=0, help="seed of the bootstrap resampling (default 0)"
    )
    fit.add_argument(
        "--params-column",
        choices=("params", "params_non_embedding"),
        default="params",
        help="the results column used as N (default: params, total with the unpadded vocabulary)",
    )
    fit.add_argument(
        "--method",
        action="append",
        default=None,
        metavar="GROUP",
        help="fit only these method groups (repeatable; e.g. token, patch_K4_lam0.667); the "
        "token group is always fitted. Default: token and every patch group with enough runs",
    )
    fit.add_argument(
        "--output",
        default=None,
        metavar="PATH",
        help="where to write the fit (default DIR/fit.json)",
    )
    fit.set_defaults(func=_fit)

    report = subparsers.add_parser(
        "report",
        help="write DIR/report.md and plots under DIR/plots/ from DIR/fit.json",
        description="Write DIR/report.md and PNG plots under DIR/plots/: loss vs compute with "
        "fitted frontiers and bands, isoFLOP slices, compute multiplier vs compute and vs "
        "tokens per parameter, lambda and K curves, residuals, fitted parameters with "
        "intervals, a held-out check (fit the smaller budgets, predict the largest runs) and "
        "run-to-run noise from repeated seeds. Needs `megapatch study fit DIR` first.",
    )
    report.add_argument("dir", metavar="DIR", help="study directory with results and fit.json")
    report.add_argument(
        "--fit", default=None, metavar="PATH", help="fit to report (default DIR/fit.json)"
    )
    report.set_defaults(func=_report)

    recommend = subparsers.add_parser(
        "recommend",
        help="the best (N, K, lambda) for a compute budget, with predicted loss and interval",
        description="For a compute budget C (FLOPs), the compute-optimal model size N and "
        "tokens D of every fitted method, its predicted loss with a bootstrap interval, and the "
        "best (N, K, lambda). Warns when C, N or D lie more than 10x beyond the fitted data.",
    )
    recommend.add_argument("dir", metavar="DIR", help="study directory with fit.json")
    recommend.add_argument(
        "--flops", type=_positive_float, required=True, metavar="C", help="compute budget, FLOPs"
    )
    recommend.add_argument(
        "--max-tokens",
        type=_positive_float,
        default=None,
        metavar="D",
        help="at most this many training tokens (e.g. the unique tokens available)",
    )
    recommend.add_argument(
        "--fit", default=None, metavar="PATH", help="fit to use (default DIR/fit.json)"
    )
    recommend.add_argument("--json", action="store_true", help="print the result as JSON")
    recommend.set_defaults(func=_recommend)
