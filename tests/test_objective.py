import math

import pytest
import torch

from trl_renyi.objective import alpha_at_step, floored_renyi_bound, normalized_log_weights, renyi_bound, routing_entropy

ALPHAS = [-1.0, 0.0, 0.5, 0.999, 1.0, 1.001, 2.0]


def reference_bound(loglik, alpha, weights):
    """Independent float64 evaluation straight from the definition (mpmath-free, via Python floats)."""
    out = []
    for row in loglik.tolist():
        if alpha == 1.0:
            out.append(sum(w * l for w, l in zip(weights, row)))
            continue
        eps = 1.0 - alpha
        terms = [math.log(w) + eps * l for w, l in zip(weights, row)]
        top = max(terms)
        out.append((top + math.log(sum(math.exp(t - top) for t in terms))) / eps)
    return torch.tensor(out, dtype=torch.float64)


def reference_responsibilities(loglik, alpha, weights):
    logits = torch.log(torch.tensor(weights, dtype=torch.float64)) + (1 - alpha) * loglik.double()
    return torch.softmax(logits, dim=-1)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("num_members", [1, 2, 4])
@pytest.mark.parametrize("weighted", [False, True])
def test_bound_matches_float64_reference(alpha, num_members, weighted):
    generator = torch.Generator().manual_seed(num_members)
    loglik = (-torch.rand(6, num_members, generator=generator, dtype=torch.float64) * 20).float()
    weights = [float(k + 1) for k in range(num_members)] if weighted else [1.0] * num_members
    total = sum(weights)
    weights = [w / total for w in weights]
    log_weights = normalized_log_weights(num_members, weights if weighted else None)
    bound = renyi_bound(loglik.clone().requires_grad_(True), alpha, log_weights if weighted else None)
    expected = reference_bound(loglik.double(), alpha, weights)
    torch.testing.assert_close(bound.value.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        bound.responsibilities.double(), reference_responsibilities(loglik, alpha, weights), rtol=1e-5, atol=1e-6
    )
    assert not bound.responsibilities.requires_grad


@pytest.mark.parametrize("alpha", ALPHAS)
def test_gradient_equals_responsibilities(alpha):
    loglik = torch.tensor([[-3.0, -1.0, -7.5, -2.0], [-0.5, -40.0, -0.6, -9.0]], requires_grad=True)
    bound = renyi_bound(loglik, alpha)
    bound.value.sum().backward()
    torch.testing.assert_close(loglik.grad, bound.responsibilities, rtol=1e-5, atol=1e-6)


def test_continuous_across_alpha_one():
    loglik = torch.tensor([[-3.0, -11.0, -0.2], [-100.0, -1.0, -50.0]], dtype=torch.float64)
    at_one = renyi_bound(loglik, 1.0).value
    for delta in [1e-9, 1e-6, 1e-4, 9e-4, 1.1e-3]:
        for alpha in (1 - delta, 1 + delta):
            near = renyi_bound(loglik, alpha).value
            if delta >= 1e-4:  # the naive reference itself divides rounding errors by 1 - α below that
                expected = reference_bound(loglik, alpha, [1 / 3] * 3)
                torch.testing.assert_close(near, expected, rtol=1e-7, atol=1e-7)
            half_var = loglik.var(dim=-1, unbiased=False) / 2  # J ≈ E ℓ + (1-α) Var ℓ / 2 near α = 1
            assert ((near - at_one).abs() <= 1.01 * delta * half_var + 1e-12).all()
    torch.testing.assert_close(at_one, loglik.mean(-1))


def test_alpha_one_uses_weights_and_uniform_responsibilities():
    loglik = torch.tensor([[-1.0, -5.0]])
    log_w = normalized_log_weights(2, [3.0, 1.0])
    bound = renyi_bound(loglik, 1.0, log_w)
    torch.testing.assert_close(bound.value, torch.tensor([0.75 * -1.0 + 0.25 * -5.0]))
    torch.testing.assert_close(bound.responsibilities, torch.tensor([[0.75, 0.25]]))


@pytest.mark.parametrize("alpha", [-3.0, 0.0, 0.5, 1.0, 1.0005, 3.0])
def test_finite_for_very_low_loglik(alpha):
    loglik = torch.tensor([[-1e4, -1.0, -5e3], [-1e4, -1e4, -1e4]], requires_grad=True)
    bound = renyi_bound(loglik, alpha)
    bound.value.sum().backward()
    assert torch.isfinite(bound.value).all() and torch.isfinite(loglik.grad).all()
    assert torch.isfinite(bound.responsibilities).all()


def test_low_precision_input_accumulates_in_float32():
    loglik = torch.tensor([[-300.0, -301.0, -299.0]], dtype=torch.bfloat16)
    bound = renyi_bound(loglik, 0.0)
    assert bound.value.dtype == torch.float32 and bound.responsibilities.dtype == torch.float32
    expected = reference_bound(loglik.double(), 0.0, [1 / 3] * 3)
    torch.testing.assert_close(bound.value.double(), expected, rtol=1e-6, atol=1e-4)


def test_alpha_limits():
    loglik = torch.tensor([[-1.0, -4.0, -9.0]], dtype=torch.float64)
    # α → −∞: max_k ℓ; α = 0: log-mean-exp
    assert abs(renyi_bound(loglik, -1e4).value.item() - (-1.0)) < 1e-3
    expected_mixture = math.log(sum(math.exp(v) for v in [-1.0, -4.0, -9.0]) / 3)
    assert abs(renyi_bound(loglik, 0.0).value.item() - expected_mixture) < 1e-12
    # monotone non-increasing in α
    values = [renyi_bound(loglik, a).value.item() for a in [-2, -1, 0, 0.5, 1, 2]]
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:]))


def test_bad_inputs():
    with pytest.raises(ValueError, match="alpha"):
        renyi_bound(torch.zeros(2, 2), float("nan"))
    with pytest.raises(ValueError, match="shape"):
        renyi_bound(torch.zeros(2), 0.5)
    with pytest.raises(ValueError, match="member_weights"):
        normalized_log_weights(2, [1.0, -1.0])
    with pytest.raises(ValueError, match="member_weights"):
        normalized_log_weights(2, [1.0, 1.0, 1.0])


def test_routing_entropy_and_warmup():
    r = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    torch.testing.assert_close(routing_entropy(r), torch.tensor([math.log(2), 0.0]))
    assert alpha_at_step(-1.0, 0.5, 4, 10) == 1.0
    assert alpha_at_step(-1.0, 0.5, 5, 10) == -1.0
    assert alpha_at_step(0.3, 0.0, 0, 10) == 0.3


@pytest.mark.parametrize("floor", [0.0, 0.1, 0.5])
def test_floored_bound_mixes_alpha_one_and_floors_gradient(floor):
    from trl_renyi.objective import floored_renyi_bound

    loglik = torch.tensor([[-1.0, -30.0, -12.0], [-4.0, -0.5, -60.0]], requires_grad=True)
    log_w = normalized_log_weights(3, [2.0, 1.0, 1.0])
    bound = floored_renyi_bound(loglik, -1.0, log_w, floor)
    bound.value.sum().backward()
    pure = renyi_bound(loglik.detach(), -1.0, log_w)
    at_one = renyi_bound(loglik.detach(), 1.0, log_w)
    torch.testing.assert_close(bound.value.detach(), (1 - floor) * pure.value + floor * at_one.value)
    torch.testing.assert_close(loglik.grad, bound.responsibilities)
    assert (bound.responsibilities >= floor * log_w.exp() - 1e-7).all()
    torch.testing.assert_close(bound.responsibilities.sum(-1), torch.ones(2))
    with pytest.raises(ValueError, match="responsibility_floor"):
        floored_renyi_bound(loglik, 0.0, None, 1.5)


# ------------------------------------------------------------------------------------ each setting, one definition
SETTINGS_AT_THE_BOUNDARY = [
    # (setting, accepted values, refused values, message)
    ("num_members", [1, 4], [0, -1, 2.0, True], r"num_members must be an integer >= 1"),
    ("alpha", [-5.0, 0.0, 1.0, 3.0], [float("nan"), float("inf"), "x", True], r"alpha must be a finite float"),
    ("responsibility_floor", [0.0, 0.999], [1.0, -0.01, float("nan"), True], r"responsibility_floor must lie in \[0, 1\)"),
    ("alpha_warmup_ratio", [0.0, 1.0], [1.01, -0.1, True], r"alpha_warmup_ratio must lie in \[0, 1\]"),
    ("member_weights", [None, [1.0, 3.0]], [[1.0, 0.0], [1.0], [1.0, float("nan")], [True, 1.0]], r"member_weights must"),
]  # fmt: skip


@pytest.mark.parametrize("name, accepted, refused, message", SETTINGS_AT_THE_BOUNDARY)
def test_each_setting_has_one_range_wherever_it_enters(tmp_path, name, accepted, refused, message):
    """The same range and message at the config, the saved metadata and the objective itself (the one check in
    trl_renyi.objective), on both sides of every boundary."""
    from trl_renyi.objective import (
        check_alpha,
        check_floor,
        check_member_weights,
        check_num_members,
        check_warmup_ratio,
    )
    from trl_renyi.model.saved_format import read_metadata
    from trl_renyi.training.config import RenyiSFTConfig

    direct = {
        "num_members": check_num_members, "alpha": check_alpha, "responsibility_floor": check_floor,
        "alpha_warmup_ratio": check_warmup_ratio, "member_weights": lambda w: check_member_weights(w, 2),
    }[name]  # fmt: skip
    base = {"num_members": 2, "member_names": ["member_0", "member_1"], "alpha": 0.0, "member_weights": [0.5, 0.5]}

    def through_metadata(value):
        folder = tmp_path / "saved"
        folder.mkdir(exist_ok=True)
        meta = {**base, name: value}
        if name == "num_members":
            meta.update(member_names=[f"member_{k}" for k in range(value)] if isinstance(value, int) and value > 0 else [],
                        member_weights=[1.0] * value if isinstance(value, int) and value > 0 else [])  # fmt: skip
        if name == "member_weights" and value is None:
            return
        (folder / "renyi_ensemble.json").write_text(__import__("json").dumps(meta))
        read_metadata(folder)

    def through_config(value):
        extra = {"num_members": 2} if name == "member_weights" else {}
        RenyiSFTConfig(output_dir=str(tmp_path), report_to="none", **{name: value, **extra})

    for value in accepted:
        direct(value)
        through_config(value)
        through_metadata(value)
    for value in refused:
        for entry in (direct, through_config, through_metadata):
            with pytest.raises(ValueError, match=message):
                entry(value)
    if name == "responsibility_floor":  # and inside the bound itself
        with pytest.raises(ValueError, match=message):
            floored_renyi_bound(torch.zeros(2, 2), 0.0, floor=1.0)
