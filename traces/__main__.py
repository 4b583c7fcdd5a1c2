"""Command line: `python -m traces synth|convert|stats` (also installed as `muxsim-traces`).

    python -m traces synth --alpha 2.1 --scale 0.5 --duration 600 -o synth.parquet
    python -m traces synth --models models.yaml --duration 600 -o yaml.parquet
    python -m traces convert azure_llm_2023_conv.csv --model llm-3 -o azure.parquet
    python -m traces stats lmsys.jsonl --models vicuna-13b=llm-0,koala-13b=llm-1 --condense 1000

Errors are one line on stderr and exit status 2; dropped rows are reported as warnings.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from typing import Any

import pandas as pd

from traces.lengths import (
    MUXSERVE_LIMITS,
    SHAREGPT_FIT,
    EmpiricalLengths,
    LengthLimits,
    LengthSampler,
)
from traces.loaders import FORMATS, load, parse_models, read_muxserve_yaml
from traces.ops import fit_alpha, stats
from traces.schema import Workload, WorkloadError
from traces.spec import SETUPS, setup
from traces.synthetic import generate

# Loader keywords the CLI can set. Only flags the user actually gave are passed on, so each
# loader's own defaults apply, and a flag that a format does not take is reported, not ignored.
_LOADER_OPTIONS = (
    "model",
    "models",
    "rate",
    "seed",
    "cv",
    "tokenizer",
    "start_s",
    "end_s",
    "condense",
    "duration_s",
)


def _mapping(text: str) -> dict[str, str]:
    try:
        return parse_models(text)
    except WorkloadError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _loader_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("loader options (each format takes some of these)")
    g.add_argument("--format", choices=list(FORMATS), help="input format (default: guessed)")
    g.add_argument("--model", help="served LLM name for single-model traces (default llm-0)")
    g.add_argument("--models", type=_mapping, help="trace=llm,... mapping for multi-model traces")
    g.add_argument("--rate", type=float, help="req/s for traces without timestamps (ShareGPT)")
    g.add_argument("--seed", type=int, help="seed for drawn arrivals")
    g.add_argument("--cv", type=float, help="CV of drawn inter-arrival times (1 = Poisson)")
    g.add_argument("--tokenizer", help="local Hugging Face tokenizer (default: approximate count)")
    g.add_argument(
        "--start", dest="start_s", type=float, help="window start, s since the first timestamp"
    )
    g.add_argument(
        "--end",
        dest="end_s",
        type=float,
        help="window end (exclusive), s since the first timestamp",
    )
    g.add_argument("--condense", type=float, help="divide inter-arrival times by this (MuxServe)")
    g.add_argument(
        "--duration",
        dest="duration_s",
        type=float,
        help="seconds of requests to generate (models YAML)",
    )
    return p


def _load(args: argparse.Namespace) -> Workload:
    options = {k: getattr(args, k) for k in _LOADER_OPTIONS if getattr(args, k) is not None}
    return load(args.input, args.format, **options)


def _write(workload: Workload, path: str) -> None:
    workload.write(path)
    n = len(workload.models)
    print(f"wrote {len(workload)} requests ({n} model{'s' * (n != 1)}) to {path}")


def cmd_synth(args: argparse.Namespace) -> None:
    spec = (
        read_muxserve_yaml(args.models_yaml)
        if args.models_yaml
        else setup(args.setup, args.alpha, args.scale)
    )
    lengths: LengthSampler = SHAREGPT_FIT
    if args.lengths_from:
        lengths = EmpiricalLengths.from_workload(load(args.lengths_from))
    limits = LengthLimits() if args.no_clip else MUXSERVE_LIMITS
    _write(
        generate(spec, args.duration, args.seed, cv=args.cv, lengths=lengths, limits=limits),
        args.output,
    )


def cmd_convert(args: argparse.Namespace) -> None:
    _write(_load(args), args.output)


def _cell(column: str, value: object) -> str:
    """Token statistics as whole tokens, rates and CVs with two decimals."""
    if not isinstance(value, float):
        return str(value)
    return f"{value:.0f}" if column.startswith(("prompt_", "output_")) else f"{value:.2f}"


def _print_table(table: pd.DataFrame, title: str) -> None:
    rows = [
        [_cell(c, v) for c, v in zip(table.columns, row, strict=True)]
        for row in table.itertuples(index=False)
    ]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(pd.DataFrame(rows, columns=table.columns).to_string(index=False))
        return
    out = Table(title=title, title_justify="left")
    for col in table.columns:
        out.add_column(str(col), justify="left" if col == "model" else "right", no_wrap=True)
    for row in rows:
        out.add_row(*row)
    console = Console()
    console.width = max(console.width, 160)  # a table cut to 80 columns when piped is unreadable
    console.print(out)


def cmd_stats(args: argparse.Namespace) -> None:
    workload = _load(args)
    meta = workload.meta
    title = f"{meta.get('source')} ({meta.get('format', '?')}): {len(workload)} requests over {workload.duration_s:.1f} s"
    _print_table(stats(workload), title)
    if len(workload.models) >= 2:
        print(f"popularity exponent alpha (MLE): {fit_alpha(workload):.3f}")
    for key in ("tokenizer", "dropped", "clipped"):
        if meta.get(key):
            print(f"{key}: {meta[key]}")


def _positive(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m traces", description="Make, convert and inspect workloads."
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "synth", help="generate a synthetic workload (MuxServe set-up or models YAML)"
    )
    source = s.add_mutually_exclusive_group()
    source.add_argument("--setup", default="muxserve-synthetic", choices=sorted(SETUPS))
    source.add_argument("--models", dest="models_yaml", metavar="YAML", help="MuxServe models YAML")
    s.add_argument("--alpha", type=float, default=0.9, help="power-law exponent (named set-up)")
    s.add_argument(
        "--scale", type=_positive, default=1.0, help="top LLM at 40*scale req/s (named set-up)"
    )
    s.add_argument("--duration", type=_positive, default=600.0, help="seconds of arrivals")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--cv", type=_positive, default=1.0, help="CV of inter-arrival times (1 = Poisson)"
    )
    s.add_argument(
        "--lengths-from",
        metavar="TRACE",
        help="resample lengths of this trace (default: ShareGPT fit)",
    )
    s.add_argument(
        "--no-clip", action="store_true", help="keep lengths as drawn (default: MuxServe limits)"
    )
    s.add_argument("-o", "--output", required=True, help="output .parquet or .csv")
    s.set_defaults(run=cmd_synth)

    c = sub.add_parser(
        "convert", parents=[_loader_flags()], help="any supported trace -> Workload Parquet/CSV"
    )
    c.add_argument("input")
    c.add_argument("-o", "--output", required=True, help="output .parquet or .csv")
    c.set_defaults(run=cmd_convert)

    t = sub.add_parser(
        "stats", parents=[_loader_flags()], help="per-model rate, CV and length percentiles"
    )
    t.add_argument("input")
    t.set_defaults(run=cmd_stats)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    log = logging.getLogger("traces")
    log.addHandler(handler)
    try:
        args: Any = parser().parse_args(argv)
        args.run(args)
    except (WorkloadError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        log.removeHandler(handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
