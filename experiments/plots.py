"""The paper's figure types, drawn from muxsim's summary tables, shared by run.py and plot.py.

Every function takes a tidy DataFrame (one row per run × system, or per run × system × LLM) and a
path, writes one PNG and returns the path, so a figure can be remade from a collected table alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: runs on headless machines and inside joblib workers

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

# One colour per system in every figure, so figures can be read side by side.
SYSTEM_COLORS = {"muxserve": "#1f77b4", "spatial": "#ff7f0e", "temporal": "#2ca02c", "search": "#9467bd"}
_MARKERS = "osD^vP*X"
SLO_COLUMN = re.compile(r"^slo_attainment@(?P<scale>[0-9.]+)$")


def _color(system: str, i: int) -> str:
    return SYSTEM_COLORS.get(system, f"C{(i + 4) % 10}")


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def natural_key(name: str) -> tuple[object, ...]:
    """llm-2 before llm-10: LLM names carry their popularity rank."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(name)))


def _plain_log(axis: object) -> None:
    """A log axis labelled 1, 2, 5, 10 rather than 10⁰, 2×10⁰: readable, and no labels collide."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # type: ignore[attr-defined]
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # type: ignore[attr-defined]
    axis.set_minor_formatter(NullFormatter())  # type: ignore[attr-defined]


def _systems(df: pd.DataFrame) -> list[str]:
    return list(pd.unique(df["system"]))


def slo_long(summary: pd.DataFrame) -> pd.DataFrame:
    """The slo_attainment@k columns of a summary table as rows (system, scale, attainment, …)."""
    cols = {c: float(m["scale"]) for c in summary.columns if (m := SLO_COLUMN.match(c))}
    keep = [c for c in summary.columns if c not in cols]
    long = summary.melt(id_vars=keep, value_vars=list(cols), var_name="column", value_name="attainment")
    long["scale"] = long["column"].map(cols)
    return long.drop(columns="column").sort_values("scale")


def line_per_system(df: pd.DataFrame, x: str, y: str, path: str | Path, *, xlabel: str, ylabel: str,
                    title: str, logy: bool = False, ylim: tuple[float, float] | None = None,
                    settled: str | None = None, error: str | None = None) -> Path:
    """y against x, one line per system; repeated x (other swept values) are averaged, so say so.

    `settled`: a flag column; points where it is false (for any run averaged in) get open markers.
    `error`: a standard-error column, drawn as ± bars (averaged like y).
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    data = df.dropna(subset=[x, y])
    repeated = bool(data.duplicated(subset=["system", x]).any())
    flagged = settled is not None and settled in data.columns
    any_open = False
    for i, system in enumerate(_systems(data)):
        part = data[data["system"] == system]
        g = part.groupby(x, as_index=False)[y].mean().sort_values(x)
        marker, color = _MARKERS[i % len(_MARKERS)], _color(system, i)
        ax.plot(g[x], g[y], marker=marker, color=color, label=system)
        if error is not None and error in part.columns:
            yerr = part.groupby(x)[error].mean().reindex(g[x]).to_numpy()
            ax.errorbar(g[x], g[y], yerr=yerr, ls="none", color=color, capsize=3)
        if flagged:
            ok = part.groupby(x)[settled].all().astype(bool).reindex(g[x]).to_numpy()
            ax.plot(g[x][~ok], g[y][~ok], ls="none", marker=marker, markerfacecolor="white", color=color)
            any_open |= bool((~ok).any())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title + (" (mean over other swept values)" if repeated else "")
                 + ("\nopen markers: not settled (the run is too short)" if any_open else ""), fontsize=10)
    if logy:
        ax.set_yscale("log")
        _plain_log(ax.yaxis)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(True, alpha=0.3)
    ax.legend(title="system")
    return _save(fig, path)


def throughput_vs_alpha(summary: pd.DataFrame, path: str | Path, alpha: str = "alpha") -> Path:
    """Paper Fig. 5 (top): aggregate throughput as popularity gets more skewed.

    The steady-state figure where the table has it (policies.metrics): the paper's requests ÷ makespan
    moves with the trace length once a system is overloaded.
    """
    if "steady_throughput_rps" in summary.columns:
        return line_per_system(summary, alpha, "steady_throughput_rps", path, xlabel="popularity skew α",
                               ylabel="steady-state throughput (req/s, ± s.e.)", title="Steady-state throughput vs α",
                               settled="steady_settled", error="steady_throughput_se_rps")
    return line_per_system(summary, alpha, "throughput_rps", path, xlabel="popularity skew α",
                           ylabel="throughput (req/s)", title="Throughput vs α")


def throughput_vs_rate(summary: pd.DataFrame, path: str | Path, rate: str = "rate_rps") -> Path:
    """Served against offered load (MuxServe's ChatLMSYS figure): steady-state req/s per system."""
    return line_per_system(summary, rate, "steady_throughput_rps", path, xlabel="offered rate (req/s)",
                           ylabel="steady-state throughput (req/s, ± s.e.)", title="Steady-state throughput vs rate",
                           settled="steady_settled", error="steady_throughput_se_rps")


def slo_vs_rate(summary: pd.DataFrame, path: str | Path, scale: float = 8, rate: str = "rate_rps") -> Path:
    """SLO attainment at one scale as load grows (MuxServe plots its ChatLMSYS study at 8×)."""
    return line_per_system(summary.assign(pct=100 * summary[f"slo_attainment@{scale:g}"]), rate, "pct", path,
                           xlabel="offered rate (req/s)", ylabel=f"SLO attainment at {scale:g}× (%)",
                           title=f"SLO attainment at {scale:g}× standalone latency vs rate", ylim=(-2, 102))


def p99_vs_rate(summary: pd.DataFrame, path: str | Path, rate: str = "rate_rps") -> Path:
    """Tail latency as offered load grows; a log scale keeps the knee visible next to the flat part."""
    return line_per_system(summary, rate, "latency_p99_s", path, xlabel="offered rate (req/s)",
                           ylabel="P99 request latency (s)", title="P99 latency vs rate", logy=True)


def slo_curves(summary: pd.DataFrame, path: str | Path, by: str | None = None,
               title: str = "SLO attainment vs SLO scale") -> Path:
    """Paper Fig. 5 (bottom): share of requests within k × their standalone latency; a panel per `by`."""
    long = slo_long(summary)
    panels = sorted(pd.unique(long[by])) if by and by in long.columns and long[by].nunique() > 1 else [None]
    ncols = min(len(panels), 3)
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols + 0.8, 3.6 * nrows + 0.4), squeeze=False,
                             sharey=True)
    for ax, value in zip(axes.flat, panels, strict=False):
        part = long if value is None else long[long[by] == value]
        for i, system in enumerate(_systems(long)):
            g = part[part["system"] == system].groupby("scale", as_index=False)["attainment"].mean()
            ax.plot(g["scale"], 100 * g["attainment"], marker=_MARKERS[i % len(_MARKERS)], markersize=4,
                    color=_color(system, i), label=system)
        ax.set_xscale("log")
        ax.set_ylim(-2, 102)
        ax.axhline(99, color="grey", lw=0.8, ls="--")
        ax.grid(True, alpha=0.3, which="both")
        ax.set_title(title if value is None else f"{by} = {value}", fontsize=10)
        ax.set_xlabel("SLO scale (× standalone latency)")
    for ax in axes[:, 0]:
        ax.set_ylabel("SLO attainment (%)")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    axes.flat[0].legend(title="system", loc="lower right", fontsize=8)
    if panels != [None]:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def grouped_bars(summary: pd.DataFrame, y: str, path: str | Path, *, by: str | None, xlabel: str,
                 ylabel: str, title: str, label: Callable[[float], str] = "{:.2f}".format,
                 note: str = "") -> Path:
    """One bar per system in each group of `by` (or a single group), mean over runs, `label(value)`
    on top; `note` goes under the axes, for what a label means."""
    groups = sorted(pd.unique(summary[by])) if by else [None]
    systems = _systems(summary)
    width = 0.8 / max(len(systems), 1)
    fig, ax = plt.subplots(figsize=(max(5.2, 1.4 * len(groups) + 2.4), 4.4 if note else 4.2))
    for i, system in enumerate(systems):
        part = summary[summary["system"] == system]
        values = [part[y].mean() if by is None else part.loc[part[by] == g, y].mean() for g in groups]
        bars = ax.bar(np.arange(len(groups)) + (i - (len(systems) - 1) / 2) * width, values, width,
                      color=_color(system, i), label=system)
        ax.bar_label(bars, labels=[label(v) for v in values], fontsize=7, padding=1)
    ax.set_xticks(np.arange(len(groups)), [f"{g:g}" if isinstance(g, float) else str(g) for g in groups]
                  if by else ["all runs"])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.margins(y=0.12)
    ax.legend(title="system", fontsize=8)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color="dimgrey", va="bottom")
        fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(fig, path)


def max_rate(summary: pd.DataFrame, path: str | Path, by: str | None = None,
             column: str = "max_rate_within_slo_rps") -> Path:
    """MuxServe's "requests within 99% SLO": the highest rate each system serves at the target SLO
    attainment, per α when α is swept. The SLO scale, target and search range come from the table,
    so the figure states them; a system that misses the target even at the lowest load searched
    has no rate, so its bar says "miss" rather than a misleading 0."""
    first = summary.iloc[0]
    slo = (f" within {first['max_rate_slo_scale']:g}× standalone latency"
           if "max_rate_slo_scale" in summary.columns else "")
    target = first["max_rate_target"] if "max_rate_target" in summary.columns else 0.99
    lowest = f" (workload.scale {first['max_rate_lo']:g})" if "max_rate_lo" in summary.columns else ""
    misses = bool((summary[column] == 0).any())
    return grouped_bars(summary, column, path, by=by, xlabel="popularity skew α" if by else "",
                        ylabel=f"highest rate within {target:.0%} SLO (req/s)",
                        title=f"Highest rate with ≥ {target:.0%} of requests{slo}",
                        label=lambda v: "miss" if v == 0 else f"{v:.3g}",
                        note=f"miss: below {target:.0%} even at the lowest load searched{lowest}" if misses else "")


def per_llm_throughput(per_llm: pd.DataFrame, path: str | Path, title: str = "Per-LLM throughput") -> Path:
    """Grouped bars: each LLM's served throughput per system, against its offered rate."""
    models = sorted(pd.unique(per_llm["model"]), key=natural_key)
    systems = _systems(per_llm)
    width = 0.8 / max(len(systems), 1)
    x = np.arange(len(models))
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.4, 0.4 * len(models) + 2)), 4.4))
    for i, system in enumerate(systems):
        g = per_llm[per_llm["system"] == system].groupby("model")["throughput_rps"].mean()
        ax.bar(x + (i - (len(systems) - 1) / 2) * width, g.reindex(models).to_numpy(), width,
               color=_color(system, i), label=system)
    if "rate_rps" in per_llm.columns and per_llm["rate_rps"].notna().any():
        offered = per_llm.groupby("model")["rate_rps"].mean().reindex(models).to_numpy()
        ax.scatter(x, offered, marker="_", s=400, color="black", zorder=3, label="offered rate")
    ax.set_xticks(x, models, rotation=45 if len(models) > 8 else 0, ha="right" if len(models) > 8 else "center")
    ax.set_xlabel("LLM (popularity order)")
    ax.set_ylabel("throughput (req/s)")
    if len(models) > 6:
        ax.set_yscale("log")
        _plain_log(ax.yaxis)
        ax.set_ylabel("throughput (req/s, log)")
    ax.set_title(title, fontsize=10)
    ax.legend(title="system", fontsize=8)
    return _save(fig, path)


def latency_cdfs(records: dict[str, pd.DataFrame], path: str | Path) -> Path:
    """TTFT and TPOT distributions per system: where the P50/P99 in the table come from."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels: Sequence[tuple[Axes, str]] = ((axes[0], "TTFT (s, log)"), (axes[1], "TPOT (s/token, log)"))
    for i, (system, df) in enumerate(records.items()):
        done = df[df["status"] == "finished"]
        ttft = (done["first_token_s"] - done["arrival_s"]).to_numpy()
        tpot = ((done["finish_s"] - done["first_token_s"]) / done["output_tokens"]).to_numpy()
        for (ax, _), values in zip(panels, (ttft, tpot), strict=True):
            v = np.sort(values[values > 0])
            if len(v):
                ax.plot(v, 100 * np.arange(1, len(v) + 1) / len(v), color=_color(system, i), label=system)
    for ax, label in panels:
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("requests (%)")
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(title="system")
    axes[0].set_title("Time to first token", fontsize=10)
    axes[1].set_title("Time per output token", fontsize=10)
    return _save(fig, path)
