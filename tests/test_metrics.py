"""Metrics against closed forms and limiting cases."""

from __future__ import annotations

import math

import pytest
import torch

from imagegen.evaluate import (class_coverage, density_coverage, frechet_distance, frechet_distance_from_stats,
                               inception_score, kid, precision_recall)


def _gauss(n, d, seed, shift=0.0, scale=1.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale + shift


def test_frechet_distance_between_known_gaussians():
    # Diagonal covariances: FD = ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 1.0])
    expected = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    assert frechet_distance_from_stats(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, rel=1e-9)
    # A full covariance and a rotation of it: FD = tr(C1) + tr(C2) - 2 tr((C1^1/2 C2 C1^1/2)^1/2)
    c = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    assert frechet_distance_from_stats(torch.zeros(2), c, torch.zeros(2), c) == pytest.approx(0.0, abs=1e-9)
    # scaling a covariance by s^2 gives (1 - s)^2 tr(C)
    assert frechet_distance_from_stats(torch.zeros(2), c, torch.zeros(2), 4 * c) == pytest.approx(float(torch.trace(c)), rel=1e-9)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    x = _gauss(2000, 8, 0)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(x, x + 1.0) == pytest.approx(8.0, rel=1e-6)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    same_mean, same_sd = kid(_gauss(2000, 16, 1), _gauss(2000, 16, 2), subsets=20, subset_size=500)
    diff_mean, _ = kid(_gauss(2000, 16, 1), _gauss(2000, 16, 3, shift=0.5), subsets=20, subset_size=500)
    assert abs(same_mean) < 0.01 and abs(same_mean) < 2 * same_sd   # unbiased: zero within its noise
    assert diff_mean > 0.3
    # normalised features: scaling every feature vector changes nothing
    assert kid(_gauss(500, 4, 1), _gauss(500, 4, 2), subsets=5, subset_size=200)[0] == pytest.approx(
        kid(_gauss(500, 4, 1) * 100, _gauss(500, 4, 2) * 100, subsets=5, subset_size=200)[0], rel=1e-9)


def test_precision_recall_density_coverage_identical_and_disjoint():
    x = _gauss(500, 4, 0)
    assert precision_recall(x, x) == (1.0, 1.0)
    assert density_coverage(x, x)[1] == 1.0
    # two samples of one distribution: density about 1, coverage high
    density, coverage = density_coverage(x, _gauss(500, 4, 5))
    assert density == pytest.approx(1.0, abs=0.15) and coverage > 0.9
    far = _gauss(500, 4, 1, shift=100.0)
    assert precision_recall(x, far) == (0.0, 0.0)
    assert density_coverage(x, far) == (0.0, 0.0)
    # a collapsed generator: high precision, low recall
    collapsed = _gauss(500, 4, 2, scale=0.05)
    p, r = precision_recall(x, collapsed)
    assert p > 0.9 and r < 0.2


def test_inception_score_and_class_coverage_limits():
    k = 10
    onehot = torch.eye(k).repeat(50, 1)                      # confident and even
    assert inception_score(onehot) == pytest.approx(k, rel=1e-6)
    assert inception_score(torch.full((100, k), 1 / k)) == pytest.approx(1.0, rel=1e-6)
    even = class_coverage(onehot)
    assert even["classes_present"] == k and even["evenness"] == pytest.approx(1.0) and even["max_share"] == pytest.approx(0.1)
    collapsed = class_coverage(torch.eye(k)[[3] * 99 + [4]])
    assert collapsed["classes_present"] == 2 and collapsed["evenness"] < 0.1 and collapsed["max_share"] == 0.99
    assert math.isclose(class_coverage(torch.eye(k)[[0] * 10])["evenness"], 0.0, abs_tol=1e-12)
