"""The paired, two-level bootstrap of stepagent/eval/stats.py on hand-checked examples."""

import itertools

import pytest

from stepagent.eval.stats import hierarchical_bootstrap, paired_differences, percentile


def test_percentile_matches_linear_interpolation():
    xs = [0.0, 1.0, 2.0, 3.0]
    assert percentile(xs, 0.0) == 0.0 and percentile(xs, 1.0) == 3.0
    assert percentile(xs, 0.5) == 1.5  # (n-1) * 0.5 = 1.5: halfway between 1 and 2
    assert percentile(xs, 0.25) == pytest.approx(0.75)


def test_one_seed_two_episodes_by_hand():
    """d = [0, 1], one seed: the resampled mean is 0 (p 1/4), 0.5 (p 1/2) or 1 (p 1/4); the 2.5% and
    97.5% quantiles are therefore 0 and 1, the mean 0.5."""
    iv = hierarchical_bootstrap({0: [0.0, 1.0]}, n_boot=4000, seed=1)
    assert iv.mean == 0.5 and (iv.lo, iv.hi) == (0.0, 1.0) and (iv.seeds, iv.episodes) == (1, 2)
    # the 30% / 70% quantiles fall on 0.5, the middle outcome that holds the mass from 25% to 75%
    iv50 = hierarchical_bootstrap({0: [0.0, 1.0]}, n_boot=4000, alpha=0.6, seed=1)
    assert (iv50.lo, iv50.hi) == (0.5, 0.5)


def test_two_levels_by_enumeration():
    """Two seeds with one episode each, d = 0 and d = 1: only the seed draw varies. Enumerated, the
    mean of the two drawn seeds is 0 (1/4), 0.5 (1/2), 1 (1/4) — the bootstrap's frequencies agree."""
    values = {0: [0.0], 1: [1.0]}
    exact = sorted((a + b) / 2 for a, b in itertools.product([0.0, 1.0], repeat=2))
    assert exact == [0.0, 0.5, 0.5, 1.0]
    iv = hierarchical_bootstrap(values, n_boot=20000, alpha=0.6, seed=3)
    assert iv.mean == 0.5 and (iv.lo, iv.hi) == (0.5, 0.5)
    wide = hierarchical_bootstrap(values, n_boot=20000, seed=3)
    assert (wide.lo, wide.hi) == (0.0, 1.0)


def test_constant_differences_give_a_point_interval_and_seeds_widen_it():
    iv = hierarchical_bootstrap({s: [2.0] * 5 for s in range(3)}, n_boot=500)
    assert (iv.mean, iv.lo, iv.hi) == (2.0, 2.0, 2.0)
    # the same episodes split over seeds that disagree: the seed level adds width
    within = hierarchical_bootstrap({0: [0.0, 10.0] * 10}, n_boot=3000, seed=0)
    between = hierarchical_bootstrap({0: [0.0] * 10, 1: [10.0] * 10}, n_boot=3000, seed=0)
    assert within.mean == between.mean == 5.0
    assert (between.hi - between.lo) > (within.hi - within.lo)


def test_paired_differences_need_the_same_episodes():
    assert paired_differences({0: [3.0, 1.0]}, {0: [1.0, 1.0]}) == {0: [2.0, 0.0]}
    with pytest.raises(ValueError, match="same seeds"):
        paired_differences({0: [1.0]}, {1: [1.0]})
    with pytest.raises(ValueError, match="same episodes"):
        paired_differences({0: [1.0, 2.0]}, {0: [1.0]})
