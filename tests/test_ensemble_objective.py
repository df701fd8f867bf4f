"""trl_renyi.training.ensemble_objective: the batch objective with no trainer — schedule, bound, finiteness check and
routing metrics against independent float64 computations."""

import math

import pytest
import torch

from trl_renyi.model.saved_format import ALPHA_METRIC, SHARE_METRIC
from trl_renyi.training.ensemble_objective import EnsembleObjective

NAMES = ("member_0", "member_1", "member_2")


def objective(alpha=-1.0, weights=(1.0, 2.0, 1.0), floor=0.0, warmup=0.0):
    log_weights = torch.log(torch.tensor(weights, dtype=torch.float64) / sum(weights))
    return EnsembleObjective(NAMES, log_weights, alpha, warmup, floor)


def reference_bound(loglik, alpha, weights, floor):
    """J_i and r_ik written out in float64 from the definitions (no library code)."""
    w = [x / sum(weights) for x in weights]
    values, resp = [], []
    for row in loglik.tolist():
        terms = [math.log(w[k]) + (1 - alpha) * row[k] for k in range(len(w))]
        top = max(terms)
        lse = top + math.log(sum(math.exp(t - top) for t in terms))
        r = [math.exp(t - lse) for t in terms]
        linear = sum(w[k] * row[k] for k in range(len(w)))
        values.append((1 - floor) * lse / (1 - alpha) + floor * linear)
        resp.append([(1 - floor) * r[k] + floor * w[k] for k in range(len(w))])
    return torch.tensor(values, dtype=torch.float64), torch.tensor(resp, dtype=torch.float64)


@pytest.mark.parametrize("alpha,floor", [(-1.0, 0.0), (0.0, 0.1), (0.5, 0.3), (-3.0, 0.1)])
def test_bound_matches_the_definition(alpha, floor):
    loglik = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    bound = objective(floor=floor).bound(loglik, alpha)
    values, resp = reference_bound(loglik, alpha, (1.0, 2.0, 1.0), floor)
    torch.testing.assert_close(bound.value, values, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bound.responsibilities, resp, rtol=1e-12, atol=1e-12)


def test_alpha_schedule_holds_one_during_the_warm_up():
    schedule = objective(alpha=-1.0, warmup=0.5)
    assert [schedule.alpha_at(step, 10) for step in (0, 4, 5, 9)] == [1.0, 1.0, -1.0, -1.0]
    assert objective(alpha=-2.0).alpha_at(0, 10) == -2.0
    assert schedule.alpha_at(0, 0) == -1.0  # no known length: no warm-up


def test_from_args_reads_the_config_fields():
    from trl_renyi import RenyiSFTConfig

    args = RenyiSFTConfig(output_dir="unused", num_members=3, alpha=-0.5, alpha_warmup_ratio=0.2,
                          member_weights=[1.0, 1.0, 2.0], responsibility_floor=0.05, use_cpu=True)  # fmt: skip
    built = EnsembleObjective.from_args(args, NAMES)
    assert (built.alpha, built.warmup_ratio, built.floor, built.num_members) == (-0.5, 0.2, 0.05, 3)
    torch.testing.assert_close(built.log_weights.exp(), torch.tensor([0.25, 0.25, 0.5]))


def test_non_finite_loglik_names_step_and_members_and_sums_over_processes():
    loglik = torch.zeros(4, 3)
    objective().check_finite(loglik, step_number=3)  # finite: silent
    loglik[2, 1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"step 7 for member member_1 \(first at example 2"):
        objective().check_finite(loglik, step_number=7)
    # finite here but not on another process: the summed count stops this process too, naming the member
    other_process = torch.tensor([0.0, 0.0, 2.0])
    with pytest.raises(FloatingPointError, match=r"member member_2 \(on another process\)"):
        objective().check_finite(torch.zeros(4, 3), 1, reduce=lambda t: t + other_process)


def test_routing_metrics_match_an_independent_computation():
    loglik = torch.tensor([[-1.0, -2.0, -4.0], [-3.0, -1.0, -1.5]], dtype=torch.float64)
    per_token = torch.tensor([2.0, 5.0])
    obj = objective(alpha=-1.0)
    bound = obj.bound(loglik, -1.0)
    metrics = obj.routing_metrics(loglik, bound.responsibilities, -1.0, per_token)
    _, resp = reference_bound(loglik, -1.0, (1.0, 2.0, 1.0), 0.0)
    entropy = -(resp * resp.log()).sum(-1).mean()
    spread = torch.tensor([torch.tensor(row).std(unbiased=False) for row in loglik.tolist()]).mean()
    assert metrics[ALPHA_METRIC] == -1.0
    assert metrics["renyi/routing_entropy"] == pytest.approx(float(entropy), rel=1e-6)
    assert metrics["renyi/loglik_std"] == pytest.approx(float(spread), rel=1e-6)
    for k, name in enumerate(NAMES):
        assert metrics[SHARE_METRIC.format(name=name)] == pytest.approx(float(resp[:, k].mean()), rel=1e-6)
        assert metrics[f"renyi/{name}/nll"] == pytest.approx(float(-loglik[:, k].sum() / 7.0), rel=1e-6)
    # without token counts the NLL is per example; summed over two processes the means are over both
    doubled = obj.routing_metrics(loglik, bound.responsibilities, -1.0, reduce=lambda t: 2 * t)
    assert doubled["renyi/member_0/nll"] == pytest.approx(2.0, rel=1e-6)  # (1 + 3) · 2 / (2 · 2)
    assert doubled[SHARE_METRIC.format(name="member_1")] == pytest.approx(float(resp[:, 1].mean()), rel=1e-6)
