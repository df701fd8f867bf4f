"""The ChaosNLI metrics against SciPy's own definitions (the ones ChaosNLI's scoreboard uses)."""

import math

import pytest
import torch

from trl_renyi.evaluation.distributions import entropies, jensen_shannon_distances, kl_divergences, spearman

scipy_distance = pytest.importorskip("scipy.spatial.distance")
scipy_stats = pytest.importorskip("scipy.stats")


def random_distributions(n, c, seed, zeros=False):
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(n, c, generator=g, dtype=torch.float64)
    if zeros:
        d[::3, 0] = 0.0  # human vote shares are often exactly zero
    return (d / d.sum(-1, keepdim=True)).tolist()


@pytest.mark.parametrize("classes", [2, 3])
def test_jsd_kl_and_entropy_match_scipy(classes):
    human = random_distributions(20, classes, 0, zeros=True)
    predicted = random_distributions(20, classes, 1)
    predicted[0] = [1.0] + [0.0] * (classes - 1)  # a zero probability: clipped at 1e-15 as ChaosNLI does
    clip = [[max(v, 1e-15) for v in row] for row in predicted]
    clip = [[v / sum(row) for v in row] for row in clip]
    jsd = jensen_shannon_distances(human, predicted)
    kl = kl_divergences(human, predicted)
    for i in range(20):
        assert float(jsd[i]) == pytest.approx(scipy_distance.jensenshannon(human[i], clip[i]), abs=1e-9)
        assert float(kl[i]) == pytest.approx(scipy_stats.entropy(human[i], clip[i]), rel=1e-9)
    assert entropies(human).tolist() == pytest.approx([scipy_stats.entropy(h) for h in human], rel=1e-12)


def test_spearman_matches_scipy_with_ties_and_is_nan_for_a_constant():
    x = [0.1, 0.4, 0.4, 0.2, 0.9, 0.0, 0.4]
    y = [1.0, 3.0, 2.0, 2.0, 5.0, 0.5, 2.0]
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-6)
    assert math.isnan(spearman([0.0] * 5, [1, 2, 3, 4, 5]))


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="differ in shape"):
        kl_divergences([[0.5, 0.5]], [[0.3, 0.3, 0.4]])
