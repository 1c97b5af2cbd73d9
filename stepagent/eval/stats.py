"""Intervals for comparing arms on the same evaluation episodes (no torch).

Every arm of an ablation is evaluated on the same episodes with the same seeds, so the
comparison is paired: for seed s and episode e, d[s][e] = score(arm) - score(baseline). The
interval of the mean difference comes from a two-level (hierarchical) percentile bootstrap:
resample the seeds with replacement, then, inside each drawn seed, its episodes with
replacement; the statistic is the mean of all drawn differences. Both sources of variation —
training randomness (seeds) and which episodes were drawn — widen the interval.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence


@dataclass
class Interval:
    mean: float
    lo: float
    hi: float
    seeds: int
    episodes: int  # per seed (the smallest, when they differ)

    def __str__(self) -> str:
        return f"{self.mean:+.1f} [{self.lo:+.1f}, {self.hi:+.1f}]"


def paired_differences(arm: Mapping[int, Sequence[float]], base: Mapping[int, Sequence[float]]) -> Dict[int, List[float]]:
    """d[s][e] = arm[s][e] - base[s][e]; the seeds and episode counts must match (same episodes)."""
    if set(arm) != set(base):
        raise ValueError(f"paired comparison needs the same seeds: {sorted(arm)} vs {sorted(base)}")
    out = {}
    for s in arm:
        a, b = list(arm[s]), list(base[s])
        if len(a) != len(b):
            raise ValueError(f"seed {s}: {len(a)} vs {len(b)} episodes; a paired comparison needs the same episodes")
        out[s] = [x - y for x, y in zip(a, b)]
    return out


def percentile(sorted_xs: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of sorted values, linear between order statistics (numpy's default)."""
    if not sorted_xs:
        raise ValueError("percentile of nothing")
    pos = q * (len(sorted_xs) - 1)
    i = int(pos)
    frac = pos - i
    if i + 1 >= len(sorted_xs):
        return float(sorted_xs[-1])
    return float(sorted_xs[i] + frac * (sorted_xs[i + 1] - sorted_xs[i]))


def hierarchical_bootstrap(values: Mapping[int, Sequence[float]], n_boot: int = 10000, alpha: float = 0.05,
                           seed: int = 0) -> Interval:
    """Mean of ``values`` (seed -> per-episode values, e.g. paired differences) with a (1 - alpha)
    percentile interval from resampling seeds, then episodes within each drawn seed."""
    seeds = sorted(values)
    if not seeds or any(len(values[s]) == 0 for s in seeds):
        raise ValueError("every seed needs at least one episode")
    flat = [x for s in seeds for x in values[s]]
    rng = random.Random(seed)
    stats = []
    for _ in range(n_boot):
        total, count = 0.0, 0
        for _ in seeds:
            xs = values[seeds[rng.randrange(len(seeds))]]
            n = len(xs)
            for _ in range(n):
                total += xs[rng.randrange(n)]
            count += n
        stats.append(total / count)
    stats.sort()
    return Interval(sum(flat) / len(flat), percentile(stats, alpha / 2), percentile(stats, 1 - alpha / 2),
                    len(seeds), min(len(values[s]) for s in seeds))
