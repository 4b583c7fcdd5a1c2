"""The throughput estimate every placer optimises: MuxServe's cost formula, memoised.

One LLM with batch b on a mesh of n GPUs completes b requests per cycle of one prefill and
avg_output decode steps:

    tpt(b) = b / (prefill(b, avg_prompt) + avg_output · decode(b, avg_prompt + avg_output/2))

LLMs sharing a mesh block each other's prefills (a prefill takes most of the SMs), so
colocated LLM i sees every prefill on the mesh in its cycle:

    tpt_i = b_i / (avg_output_i · decode_i(b_i) + Σ_j prefill_j(b_j))

Under temporal multiplexing (one job at a time) the whole of every other LLM's cycle blocks it:

    tpt_i = b_i / Σ_j (prefill_j(b_j) + avg_output_j · decode_j(b_j))

Batch choice. b_i is the batch that serves the rate — by Little's law the mean number of requests
in flight is rate × cycle time, and the smallest b with tpt(b) ≥ rate is exactly that — capped by
the LLM's share of the KV pool and by `batch_limit_per_gpu` × n (the measured range of MuxServe's
A100 table). If no batch meets the rate, the best-throughput batch is taken. On a shared mesh the
batches depend on each other through the blocking term; they are solved by a monotone fixed point
(each b only grows, so it ends).

Score. A mesh is worth Σ_i rate_i · min(tpt_i, rate_i): an LLM cannot serve more than arrives,
and weighting by rate makes the cluster total, divided by Σ rate, the rate-weighted mean
throughput that the metrics report for a run. Sums are taken with math.fsum (exactly rounded,
so independent of order): once every rate is met the estimate saturates, and placements that
serve everything must tie exactly for the tie-breaks (spread load, use every GPU) to apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache

from policies.cost import CostModel
from policies.placement import SM_UNIT_PCT, SM_UNITS_FULL, kv_pool_blocks
from policies.specs import ClusterSpec, ModelSpec

from .demand import Demand

Member = tuple[int, int, int]  # (LLM index, prefill SM %, decode SM %)
SPATIAL_RULES = ("paper", "fit", "fit-cluster")  # see placement_algos.spatial


@dataclass(frozen=True)
class PlacerOptions:
    """Knobs of all placers; each placer reads the ones it needs."""

    # Decode shares the greedy may give an LLM (MuxServe: 30..90%).
    decode_shares: tuple[int, ...] = tuple(range(30, 100, 10))
    # Prefill share by model size: the first (params below, share) that applies, else 100%.
    # MuxServe: 7B 80%, 13B 90%, 30B/65B 100%.
    prefill_tiers: tuple[tuple[float, int], ...] = ((10e9, 80), (20e9, 90))
    batch_limit_per_gpu: int = 256
    overload_units: int = 2  # decode shares on a mesh may sum to 100% + this × 10%
    prune: bool = True  # skip mesh groups that cannot beat the best so far (exact)
    spatial_rule: str = "paper"  # GPUs per LLM of the spatial baseline: one of SPATIAL_RULES
    spatial_gpus: tuple[tuple[str, int], ...] = ()  # (LLM name, GPUs): explicit counts, whatever the rule
    seed: int = 0
    iterations: int = 20_000  # simulated-annealing steps of the search placer
    brute_force_limit: int = 20_000  # the search enumerates every assignment when there are at most this many

    @property
    def sm_budget(self) -> int:
        return 100 + self.overload_units * SM_UNIT_PCT

    def prefill_sm(self, model: ModelSpec) -> int:
        return next((share for below, share in self.prefill_tiers if model.params < below), 100)

    def __post_init__(self) -> None:
        """Every option in its range, checked where options enter: a negative overload budget, for
        one, would place LLMs that can never launch, and every request would fail."""
        def integer(name: str, lowest: int, highest: float = math.inf) -> None:
            value = getattr(self, name)
            upper = "" if highest == math.inf else f" and ≤ {highest:g}"
            if isinstance(value, bool) or not isinstance(value, int) or not lowest <= value <= highest:
                raise ValueError(f"{name} must be an integer ≥ {lowest}{upper} (got {value!r})")

        integer("batch_limit_per_gpu", 1)
        integer("overload_units", 0, SM_UNITS_FULL)
        integer("seed", 0)
        integer("iterations", 0)
        integer("brute_force_limit", 0)
        if not isinstance(self.prune, bool):
            raise ValueError(f"prune must be true or false (got {self.prune!r})")
        if not isinstance(self.decode_shares, tuple) or not self.decode_shares:
            raise ValueError(f"decode_shares must be a non-empty list of SM shares (got {self.decode_shares!r})")
        tiers = self.prefill_tiers
        if not isinstance(tiers, tuple) or any(not isinstance(t, tuple) or len(t) != 2
                                               or not isinstance(t[0], int | float) for t in tiers):
            raise ValueError(f"prefill_tiers must be a list of [parameters below, SM share] pairs (got {tiers!r})")
        shares = (*self.decode_shares, *(s for _, s in tiers))
        if any(isinstance(s, bool) or not isinstance(s, int) or s % SM_UNIT_PCT
               or not SM_UNIT_PCT <= s <= SM_UNITS_FULL * SM_UNIT_PCT for s in shares):
            raise ValueError(f"SM shares must be multiples of {SM_UNIT_PCT} within 10..100 (got {shares})")
        if self.spatial_rule not in SPATIAL_RULES:
            raise ValueError(f"spatial_rule must be one of {', '.join(SPATIAL_RULES)} (got {self.spatial_rule!r})")
        bad = [(name, n) for name, n in self.spatial_gpus if not (isinstance(n, int) and n >= 1 and n & (n - 1) == 0)]
        if bad:
            raise ValueError(f"spatial_gpus: {bad[0][0]}: the GPU count must be a power of two ≥ 1 (got {bad[0][1]!r})")


@dataclass(frozen=True)
class Candidate:
    """An LLM's decode share on a mesh size, chosen alone on the mesh (MuxServe Alg. 1)."""

    size: int
    decode_sm: int
    tpt: float
    meets_rate: bool


@dataclass(frozen=True)
class MeshEstimate:
    """The estimate of one mesh; per-LLM tuples follow the members' order."""

    terms: tuple[float, ...]  # rate_i · min(tpt_i, rate_i)
    kv_blocks: int
    batch: tuple[int, ...]  # the operating batch (Little's law)
    cap: tuple[int, ...]  # the batch the estimate allows: KV share and per-GPU limit
    tpt: tuple[float, ...]

    @property
    def value(self) -> float:
        return math.fsum(self.terms)


@cache
def _knots(cap: int) -> tuple[int, ...]:
    """Batches at which tpt(b) can peak: powers of two (the table's batch grid) and the cap.

    Latency is linear in b between grid points, so b / latency is monotone on each segment and
    its maximum over [1, cap] sits on one of these.
    """
    return (*(1 << k for k in range(cap.bit_length()) if 1 << k < cap), cap)


def power_sizes(gpus: int) -> tuple[int, ...]:
    """Mesh sizes a node of `gpus` GPUs can hold: powers of two, as tensor parallelism needs."""
    return tuple(1 << k for k in range(gpus.bit_length()))


@dataclass
class Estimator:
    """Memoised latencies, per-LLM candidates and mesh estimates for one placement problem.

    Memo keys use a profile id — (model, lengths) — instead of the LLM, so the twelve identical
    7B LLMs of the paper's workload share every latency lookup.
    """

    demands: list[Demand]
    cluster: ClusterSpec
    cost: CostModel
    opts: PlacerOptions = field(default_factory=PlacerOptions)

    def __post_init__(self) -> None:
        profiles: dict[tuple[str, float, float], int] = {}
        self._profile = [profiles.setdefault((d.model.name, d.avg_prompt, d.avg_output), len(profiles))
                         for d in self.demands]
        self.prefill_sm = [self.opts.prefill_sm(d.model) for d in self.demands]
        self._lat: dict[tuple[int, ...], float] = {}
        self._mesh: dict[tuple[int, tuple[Member, ...], bool], MeshEstimate | None] = {}
        self.candidates = [self._candidates(i) for i in range(len(self.demands))]

    # ---- latency ------------------------------------------------------------------------------
    def _prefill(self, i: int, n: int, sm: int, b: int) -> float:
        key = (0, self._profile[i], n, sm, b)
        t = self._lat.get(key)
        if t is None:
            d = self.demands[i]
            t = self._lat[key] = self.cost.prefill_time(d.model, n, sm, b, d.avg_prompt)
        return t

    def _decode_all(self, i: int, n: int, sm: int, b: int) -> float:
        """All decode steps of one cycle."""
        key = (1, self._profile[i], n, sm, b)
        t = self._lat.get(key)
        if t is None:
            d = self.demands[i]
            t = self._lat[key] = d.avg_output * self.cost.decode_time(d.model, n, sm, b, d.decode_ctx)
        return t

    def _cycle(self, m: Member, n: int, b: int) -> float:
        return self._prefill(m[0], n, m[1], b) + self._decode_all(m[0], n, m[2], b)

    def _blocking(self, m: Member, n: int, b: int, exclusive: bool) -> float:
        """How long this LLM's batch holds up the other LLMs on the mesh."""
        return self._cycle(m, n, b) if exclusive else self._prefill(m[0], n, m[1], b)

    def _waits(self, members: tuple[Member, ...], n: int, batch: list[int], exclusive: bool) -> list[float]:
        """Per member, how long the others' batches hold it up in each of its cycles."""
        block = [self._blocking(m, n, b, exclusive) for m, b in zip(members, batch, strict=True)]
        return [math.fsum(block[:k] + block[k + 1:]) for k in range(len(block))]

    def _batch_for_rate(self, m: Member, n: int, cap: int, wait: float) -> int:
        """Smallest b ≤ cap with b / (cycle(b) + wait) ≥ rate, else the best b (see module doc)."""
        rate = self.demands[m[0]].rate

        def tpt(b: int) -> float:
            cycle = self._cycle(m, n, b) + wait  # 0 only where a table extrapolates down to zero
            return b / cycle if cycle > 0 else math.inf

        prev, best, best_tpt = 0, 1, -1.0
        for b in _knots(cap):
            t = tpt(b)
            if t >= rate:
                lo, hi = prev, b  # invariant: tpt(lo) < rate (or lo = 0), tpt(hi) ≥ rate
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    lo, hi = (lo, mid) if tpt(mid) >= rate else (mid, hi)
                return hi
            if t > best_tpt:
                best, best_tpt = b, t
            prev = b
        return best

    # ---- meshes -------------------------------------------------------------------------------
    def mesh(self, n: int, members: tuple[Member, ...], exclusive: bool = False) -> MeshEstimate | None:
        """Estimate of `members` (sorted) sharing n GPUs; None when their memory does not fit."""
        key = (n, members, exclusive)
        if key not in self._mesh:
            self._mesh[key] = self._estimate(n, members, exclusive)
        return self._mesh[key]

    def _caps(self, n: int, members: tuple[Member, ...]) -> tuple[int, tuple[int, ...]] | None:
        """KV pool and per-LLM batch ceilings, or None if the pool cannot hold one request each.

        The pool is split as ADBS starts it: ∝ rate × KV size, after one request's room each.
        """
        ds = [self.demands[m[0]] for m in members]
        pool = kv_pool_blocks(self.cluster, n, [d.model for d in ds])
        need = [d.request_blocks for d in ds]
        spare = pool - sum(need)
        if spare < 0:
            return None
        weights = [d.rate * d.model.kv_bytes_per_token + 1e-9 for d in ds]
        total = sum(weights)
        limit = self.opts.batch_limit_per_gpu * n
        return pool, tuple(min(limit, int((r + spare * w / total) // r)) for r, w in zip(need, weights, strict=True))

    def _estimate(self, n: int, members: tuple[Member, ...], exclusive: bool) -> MeshEstimate | None:
        caps = self._caps(n, members)
        if caps is None:
            return None
        pool, cap = caps
        batch = [self._batch_for_rate(m, n, c, 0.0) for m, c in zip(members, cap, strict=True)]
        while len(members) > 1:
            waits = self._waits(members, n, batch, exclusive)
            grown = [max(b, self._batch_for_rate(m, n, c, w))
                     for m, b, c, w in zip(members, batch, cap, waits, strict=True)]
            if grown == batch:
                break
            batch = grown
        waits = self._waits(members, n, batch, exclusive)
        tpt = tuple(b / (self._cycle(m, n, b) + w) for m, b, w in zip(members, batch, waits, strict=True))
        rates = [self.demands[m[0]].rate for m in members]
        terms = tuple(r * min(t, r) for r, t in zip(rates, tpt, strict=True))
        return MeshEstimate(terms, pool, tuple(batch), cap, tpt)

    def batch_ceiling(self, i: int, n: int, kv_blocks: int) -> int:
        """The most requests LLM i could run with the whole pool: its runtime `max_batch`.

        Not the estimate's cap: ADBS moves KV quota to busy LLMs, and a ceiling at the share an
        LLM starts with would starve it in a burst.
        """
        return max(1, min(self.opts.batch_limit_per_gpu * n, kv_blocks // self.demands[i].request_blocks))

    # ---- MuxServe's per-LLM candidates ----------------------------------------------------------
    def _candidates(self, i: int) -> dict[int, Candidate]:
        """Per mesh size that fits: the smallest decode share meeting the rate, else the best one."""
        d, out = self.demands[i], {}
        for n in power_sizes(self.cluster.gpus_per_node):
            if not self.cost.supports(d.model, n):
                continue
            best: Candidate | None = None
            for share in sorted(self.opts.decode_shares):
                est = self.mesh(n, ((i, self.prefill_sm[i], share),))
                if est is None:
                    break
                c = Candidate(n, share, est.tpt[0], est.tpt[0] >= d.rate)
                if c.meets_rate:
                    best = c
                    break
                if best is None or c.tpt > best.tpt:
                    best = c
            if best is not None and best.tpt > 0:  # 0: no measured latency at any batch
                out[n] = best
        return out

    def members(self, n: int, llms: tuple[int, ...]) -> tuple[Member, ...]:
        """The MuxServe members of a mesh: each LLM at its prefill share and candidate decode share."""
        return tuple((i, self.prefill_sm[i], self.candidates[i][n].decode_sm) for i in sorted(llms))

    def terms(self, n: int, llms: tuple[int, ...]) -> tuple[float, ...] | None:
        """Score terms of LLMs sharing an n-GPU mesh under MuxServe; None if infeasible.

        Infeasible: an LLM without a candidate at n (too big, or no latencies), decode shares over
        the SM budget, or a KV pool that cannot hold one request per LLM.
        """
        if not llms:
            return ()
        if any(n not in self.candidates[i] for i in llms):
            return None
        if sum(self.candidates[i][n].decode_sm for i in llms) > self.opts.sm_budget:
            return None
        est = self.mesh(n, self.members(n, llms))
        return None if est is None else est.terms

    def value(self, n: int, llms: tuple[int, ...]) -> float | None:
        terms = self.terms(n, llms)
        return None if terms is None else math.fsum(terms)

    def upper_bound(self, i: int, sizes: set[int]) -> float:
        """Best score term LLM i can reach on any of these mesh sizes: alone at its candidate share.

        Company only lowers it (less KV, more blocking), which makes group pruning exact.
        """
        d = self.demands[i]
        return max((d.rate * min(c.tpt, d.rate) for n, c in self.candidates[i].items() if n in sizes),
                   default=float("-inf"))

    @property
    def total_rate(self) -> float:
        return sum(d.rate for d in self.demands)

    def throughput(self, score: float) -> float:
        """A score as the rate-weighted mean throughput, req/s (0 when nothing arrives)."""
        return score / self.total_rate if self.total_rate else 0.0
