"""The local stability criterion (``trl_renyi.stability``) against independent float64 computations on tiny models.

The references below write the matrices out in full — every unit's gradient by plain autograd, the model's Fisher
summed outcome by outcome, F and G as P × P matrices — and solve the generalised eigenproblem directly; the library
never forms a P × P matrix. Further: the full Hessian against the Fisher, the second-order prediction against finite
differences of the bound along ±v₁, the calibrated null (data drawn from the model sits inside it, a planted conflict
far above it) and per-vote against per-annotator units on a toy whose answer is known.
"""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from trl_renyi.model.per_example import LoraGradientCapture, adapter_parameters
from trl_renyi.objective import renyi_bound
from trl_renyi.stability import (
    PairVotes,
    SequenceVotes,
    choice_votes,
    critical_alpha,
    gradient_table,
    measure_stability,
    recommend_alpha,
    spread_is_favourable,
    spread_spectrum,
)
from trl_renyi.testing import tiny_llama, tiny_tokenizer

PROMPTS = [
    "What colour is the sky?", "Say hello.", "Name a colour.", "What is two plus three?",
    "Count to three.", "What is the capital of France?", "What colour is grass?", "Say good morning.",
]  # fmt: skip
OPTIONS = [" yes", " no"]
GROUP_A, GROUP_B = ["a0", "a1", "a2"], ["b0", "b1", "b2"]
DAMPING = 0.1


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def tiny_lora(tok, seed=0, rank=2, modules=("q_proj", "v_proj", "o_proj")):
    base = tiny_llama(tok, seed=seed, init_std=0.2, dtype=torch.float64)
    base.set_attn_implementation("eager")  # the Hessian test differentiates twice, which CPU flash attention cannot
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=list(modules), layers_to_transform=[1], lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    model = get_peft_model(base, config)
    model.eval()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.1)
    return model


def params_of(model):
    params = [p for _, p in adapter_parameters(model, "default")]
    for p in params:
        p.requires_grad_(True)
    return params


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


class ChoiceScorer:
    """Every (prompt, option) sequence of a set of items in one padded batch: the items' choice log-probabilities."""

    def __init__(self, tok, prompts, options):
        self.prompts, self.options = prompts, options
        rows, spans = [], []
        for prompt in prompts:
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            for option in options:
                o = tok(option, add_special_tokens=False)["input_ids"]
                rows.append(p + o)
                spans.append((len(p), len(o)))
        width = max(map(len, rows))
        self.ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        self.mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        self.spans = spans

    def log_choice(self, model):
        """``(items, options)`` choice log-probabilities log softmax_c(s_c)."""
        log_probs = model(input_ids=self.ids, attention_mask=self.mask).logits.log_softmax(-1)
        sums = []
        for row, (start, length) in enumerate(self.spans):
            targets = self.ids[row, start : start + length]
            sums.append(log_probs[row, start - 1 : start - 1 + length].gather(-1, targets[:, None]).sum())
        return torch.stack(sums).view(len(self.prompts), len(self.options)).log_softmax(-1)


def planted_rows(prompts=PROMPTS):
    """Group A's annotators always answer " yes", group B's always " no": pooled, every prompt is 50/50."""
    return [
        {"prompt": p, "options": OPTIONS, "label": 0 if a in GROUP_A else 1, "annotator": a}
        for p in prompts
        for a in GROUP_A + GROUP_B
    ]


def fit(model, scorer, rows, steps=120, lr=0.05):
    """θ*: maximise Σ_votes log p(label) over the adapter (Adam, full batch)."""
    params = params_of(model)
    item = {p: i for i, p in enumerate(scorer.prompts)}
    index = torch.tensor([item[r["prompt"]] for r in rows])
    labels = torch.tensor([r["label"] for r in rows])
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = -scorer.log_choice(model)[index, labels].sum()
        loss.backward()
        optimizer.step()
    for p in params:
        p.grad = None
    return model


@pytest.fixture(scope="module")
def planted(tok):
    """A tiny model fitted to the planted two-group data (one model: every prompt near 50/50)."""
    model = tiny_lora(tok)
    scorer = ChoiceScorer(tok, PROMPTS, OPTIONS)
    return fit(model, scorer, planted_rows()), scorer


def reference_choice(model, scorer, rows, unit_key):
    """F (P × P) over the units and the exact Fisher G of the votes, written out."""
    params = params_of(model)
    log_choice = scorer.log_choice(model)
    item = {p: i for i, p in enumerate(scorer.prompts)}
    outcome = {}
    for i in range(len(scorer.prompts)):
        for c in range(len(scorer.options)):
            outcome[i, c] = flat(torch.autograd.grad(log_choice[i, c], params, retain_graph=True))
    size = outcome[0, 0].numel()
    units, fisher = {}, torch.zeros(size, size, dtype=torch.float64)
    probs = log_choice.detach().exp()
    for row in rows:
        i = item[row["prompt"]]
        g = outcome[i, row["label"]]
        units.setdefault(unit_key(row), torch.zeros(size, dtype=torch.float64)).add_(g)
        for c in range(len(scorer.options)):
            fisher += probs[i, c] * torch.outer(outcome[i, c], outcome[i, c])
    gradients = torch.stack(list(units.values()), dim=1)
    return gradients, fisher, float(len(rows))


def reference_eigen(gradients, fisher, total_weight, damping=DAMPING):
    """Top generalised eigenpairs of F = A Aᵀ against G + δI, δ = damping · tr G / Σ w, over the directions v with
    vᵀ Σ_u g_u = 0 (the spread directions away from a fit), and the units' scores; all P × P."""
    size = fisher.shape[0]
    delta = damping * torch.trace(fisher) / total_weight
    chol = torch.linalg.cholesky(fisher + delta * torch.eye(size, dtype=torch.float64))
    inverse = torch.linalg.inv(chol)
    total = inverse @ gradients.sum(1)  # the total gradient, whitened; treated as zero close to a fit
    whitened = inverse @ gradients
    projector = torch.eye(size, dtype=torch.float64)
    if total @ total > 1e-3 * whitened.shape[1] * (whitened * whitened).sum():
        projector -= torch.outer(total, total) / (total @ total)
    values, vectors = torch.linalg.eigh(projector @ inverse @ gradients @ gradients.T @ inverse.T @ projector)
    values, vectors = values.flip(0), vectors.flip(1)
    directions = inverse.T @ vectors  # vᵀ(G + δI)v = 1 and vᵀ Σ_u g_u = 0
    return values, directions, gradients.T @ directions


def assert_same_spectrum(library_values, reference_values, count, rtol=1e-6):
    top = reference_values[0]
    for j in range(count):
        if reference_values[j] > 1e-3 * top:  # smaller ones are rounding noise of the eigen solvers
            assert library_values[j] == pytest.approx(float(reference_values[j]), rel=rtol)


@pytest.mark.parametrize("unit, share_prompt", [("row", True), ("source", True), ("source", False)])
def test_choice_eigenvalues_and_scores_equal_the_full_computation(planted, tok, unit, share_prompt):
    """Per row and per source; each item's prompt run once for its options (the packed layout) or once per option.
    (Per row the top eigenvalues are nearly equal — every vote is a 50/50 coin — so only per source, where λ₁ stands
    alone, are its direction and split scores compared.)"""
    model, scorer = planted
    rows = planted_rows()
    votes = choice_votes(rows, tok, unit=unit, source_key="annotator")
    table = gradient_table(model, tok, votes, sketch_dim=None, share_prompt=share_prompt)
    assert table.exact and table.num_parameters == sum(p.numel() for p in params_of(model))
    spectrum = spread_spectrum(table, damping=DAMPING, num_directions=4, null_draws=0)
    key = (lambda r: r["annotator"]) if unit == "source" else (lambda r: id(r))
    values, directions, scores = reference_eigen(*reference_choice(model, scorer, rows, key))
    assert_same_spectrum(spectrum.eigenvalues, values, 3)
    if unit == "row":
        return
    # the top direction's split scores g_uᵀv₁, up to the eigenvector's sign
    ours, theirs = spectrum.scores[0].double(), scores[:, 0]
    sign = torch.sign((ours * theirs).sum())
    torch.testing.assert_close(ours, sign * theirs, rtol=1e-4, atol=1e-6 * float(theirs.abs().max()))
    # and the direction itself, in parameter space (exact gradients)
    torch.testing.assert_close(spectrum.directions[0], sign * directions[:, 0], rtol=1e-5, atol=1e-8)


def test_sequence_votes_equal_the_full_computation_with_the_same_samples(tok):
    """Free-text votes (SFT rows) routed by source: data gradients of the observed completions, the Fisher from the
    completions sampled along each prefix (the same samples, read back from the table), F and G in full."""
    model = tiny_lora(tok, seed=1)
    texts = [("What colour is the sky?", " It is blue."), ("Say hello.", " Ahoy matey!"), ("Count to three.", " one two three")]
    ids, labels, units = [], [], []
    for k, (prompt, completion) in enumerate(texts * 2):
        p, c = tok(prompt)["input_ids"], tok(completion)["input_ids"]
        ids.append(p + c)
        labels.append([-100] * len(p) + c)
        units.append(k % 2)
    weights = [1.0, 2.0, 0.5, 1.0, 1.5, 1.0]
    votes = SequenceVotes(ids, labels, weights, units, ["s0", "s1"])
    table = gradient_table(model, tok, votes, sketch_dim=None, fisher_samples=2, null_samples=1, seed=3)
    spectrum = spread_spectrum(table, damping=DAMPING, num_directions=2, null_draws=0)
    params = params_of(model)
    size = sum(p.numel() for p in params)

    def gradient(sequence, prompt_length, targets):
        """∇ Σ_t log p(target_t | observed prefix): the observed sequence is the input, whatever the targets."""
        log_probs = model(input_ids=torch.tensor([sequence])).logits[0, :-1].log_softmax(-1)
        positions = range(prompt_length - 1, prompt_length - 1 + len(targets))
        total = sum(log_probs[t, token] for t, token in zip(positions, targets))
        return flat(torch.autograd.grad(total, params))

    unit_gradients = torch.zeros(size, 2, dtype=torch.float64)
    fisher = torch.zeros(size, size, dtype=torch.float64)
    for v, (sequence, label) in enumerate(zip(ids, labels)):
        prompt_length = sum(1 for t in label if t == -100)
        completion = sequence[prompt_length:]
        unit_gradients[:, units[v]] += weights[v] * gradient(sequence, prompt_length, completion)
        for sample in table.details["sampled_tokens"][v][:2]:  # the Fisher's samples (the last one is the null's)
            g = gradient(sequence, prompt_length, sample)
            fisher += weights[v] / 2 * torch.outer(g, g)
    values, _, _ = reference_eigen(unit_gradients, fisher, sum(weights))
    assert_same_spectrum(spectrum.eigenvalues, values, 2)


def test_pair_votes_equal_the_full_computation(tok):
    """DPO pairs: ℓ = log σ(m) against the base model (adapter off); the Bernoulli Fisher σ(m)σ(−m)∇m∇mᵀ."""
    model = tiny_lora(tok, seed=2)
    triples = [
        ("What colour is the sky?", " blue", " green"), ("Say hello.", " Ahoy!", " Good morning."),
        ("Count to three.", " one two three", " three"), ("Name a colour.", " red", " blue"),
    ]  # fmt: skip
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    beta = 0.5
    votes = PairVotes(
        [encode(p) for p, _, _ in triples], [encode(c) for _, c, _ in triples], [encode(r) for _, _, r in triples],
        [1.0] * 4, [0, 1, 2, 3], beta, ["p0", "p1", "p2", "p3"],
    )  # fmt: skip
    spectrum = spread_spectrum(gradient_table(model, tok, votes, sketch_dim=None), damping=DAMPING, null_draws=0)
    params = params_of(model)

    def sequence_logp(prompt, completion):
        p, c = encode(prompt), encode(completion)
        log_probs = model(input_ids=torch.tensor([p + c])).logits[0, :-1].log_softmax(-1)
        return sum(log_probs[len(p) - 1 + j, t] for j, t in enumerate(c))

    columns, fisher = [], 0
    for prompt, chosen, rejected in triples:
        with torch.no_grad(), model.disable_adapter():
            reference = sequence_logp(prompt, chosen) - sequence_logp(prompt, rejected)
        margin = beta * (sequence_logp(prompt, chosen) - sequence_logp(prompt, rejected) - reference)
        grad_margin = flat(torch.autograd.grad(margin, params))
        p = torch.sigmoid(margin.detach())
        columns.append((1 - p) * grad_margin)  # ∇ log σ(m)
        fisher = fisher + p * (1 - p) * torch.outer(grad_margin, grad_margin)
    values, _, _ = reference_eigen(torch.stack(columns, dim=1), fisher, 4.0)
    assert_same_spectrum(spectrum.eigenvalues, values, 3)


def hessian(model, scorer, rows):
    """H = ∇² Σ_votes log p(label) over the adapter, one Hessian-vector product per parameter (P × P)."""
    params = params_of(model)
    item = {p: i for i, p in enumerate(scorer.prompts)}
    index = torch.tensor([item[r["prompt"]] for r in rows])
    labels = torch.tensor([r["label"] for r in rows])
    total = scorer.log_choice(model)[index, labels].sum()
    grad = flat(torch.autograd.grad(total, params, create_graph=True))
    columns = [flat(torch.autograd.grad(grad[j], params, retain_graph=True)) for j in range(grad.numel())]
    return torch.stack(columns)


@pytest.fixture(scope="module")
def small_planted(tok):
    """The planted data on a smaller adapter (P = 224), with its full Hessian."""
    model = tiny_lora(tok, seed=4, rank=1, modules=("v_proj", "o_proj"))
    scorer = ChoiceScorer(tok, PROMPTS, OPTIONS)
    fit(model, scorer, planted_rows(), steps=200)
    return model, scorer, hessian(model, scorer, planted_rows())


def test_fisher_against_the_full_hessian(small_planted, tok):
    """At the fit, λ₁ of F against the model's Fisher (+δI) against λ₁ against the true −H (+δI), both in full.
    Measured here: 7.92455 against 7.92453 (2·10⁻⁶ apart; per-vote units 0.99517 against 0.99516): where the fit
    reproduces every prompt's vote share, the Hessian's residual term Σ_c (y_c − p_c)∇²s_c vanishes and the Fisher is
    −H. It departs from −H where one model cannot match an item's shares (the misspecified case), which is why the
    null, not λ = 1, is the reference."""
    model, scorer, h = small_planted
    rows = planted_rows()
    gradients, fisher, weight = reference_choice(model, scorer, rows, lambda r: r["annotator"])
    delta = DAMPING * torch.trace(fisher) / weight
    size = fisher.shape[0]
    negative = -h + delta * torch.eye(size, dtype=torch.float64)
    assert torch.linalg.eigvalsh(negative).min() > 0  # a local maximum (with the prior)
    chol = torch.linalg.cholesky((negative + negative.T) / 2)
    inverse = torch.linalg.inv(chol)
    lambda_hessian = torch.linalg.eigvalsh(inverse @ gradients @ gradients.T @ inverse.T).max()
    votes = choice_votes(rows, tok, unit="source", source_key="annotator")
    lambda_fisher = spread_spectrum(gradient_table(model, tok, votes, sketch_dim=None), damping=DAMPING, null_draws=0).eigenvalues[0]
    assert lambda_fisher == pytest.approx(float(lambda_hessian), rel=0.01)


def choice_loglik(model, scorer, rows, unit_key):
    """ℓ_u for every unit (sum of its votes' choice log-probabilities), no gradient."""
    with torch.no_grad():
        log_choice = scorer.log_choice(model)
    item = {p: i for i, p in enumerate(scorer.prompts)}
    units = {}
    for row in rows:
        units[unit_key(row)] = units.get(unit_key(row), 0.0) + float(log_choice[item[row["prompt"]], row["label"]])
    return torch.tensor(list(units.values()), dtype=torch.float64)


def test_second_order_prediction_against_finite_differences(small_planted, tok):
    r"""Two members at θ* ± εv₁: the bound's change equals ½ε²·v₁ᵀ[H + (1−α)F]v₁ (to O(ε³)), and its sign flips where
    the criterion says, (1−α)λ₁ = 1 with the Fisher for −H: spread loses at α* + 0.3 and wins at α* − 0.3."""
    model, scorer, h = small_planted
    rows = planted_rows()
    unit = lambda r: r["annotator"]  # noqa: E731
    votes = choice_votes(rows, tok, unit="source", source_key="annotator")
    spectrum = spread_spectrum(gradient_table(model, tok, votes, sketch_dim=None), damping=DAMPING, null_draws=0)
    lambda1, v = spectrum.eigenvalues[0], spectrum.directions[0]
    alpha_star = critical_alpha(lambda1)
    gradients, _, _ = reference_choice(model, scorer, rows, unit)
    f = gradients @ gradients.T
    params = params_of(model)
    centre = [p.detach().clone() for p in params]

    def members_loglik(epsilon):
        columns = []
        for sign in (1.0, -1.0):
            offset = 0
            with torch.no_grad():
                for p, c in zip(params, centre):
                    p.copy_(c + sign * epsilon * v[offset : offset + p.numel()].view_as(p))
                    offset += p.numel()
            columns.append(choice_loglik(model, scorer, rows, unit))
        with torch.no_grad():
            for p, c in zip(params, centre):
                p.copy_(c)
        return torch.stack(columns, dim=1)

    collapsed = choice_loglik(model, scorer, rows, unit)[:, None].expand(-1, 2)
    epsilon = 0.02
    spread = members_loglik(epsilon)
    for alpha in (alpha_star + 0.3, alpha_star - 0.3, 0.0, -1.0):
        change = float(renyi_bound(spread, alpha).value.sum() - renyi_bound(collapsed, alpha).value.sum())
        predicted = 0.5 * epsilon**2 * float(v @ (h + (1 - alpha) * f) @ v)
        assert change == pytest.approx(predicted, rel=0.05, abs=1e-3 * epsilon**2)
        fisher_says = (1 - alpha) * lambda1 - 1
        if abs(fisher_says) > 0.2:
            assert math.copysign(1, change) == math.copysign(1, fisher_says)


def test_model_drawn_labels_sit_inside_the_null_and_a_planted_conflict_far_above(planted, tok):
    """Per-annotator units: the planted conventions give λ₁ far above the null's 99 % quantile; labels drawn from the
    fitted model itself (information equality holds by construction) give a λ₁ inside the null."""
    model, scorer = planted
    rows = planted_rows()
    report = measure_stability(
        model, tok, choice_votes(rows, tok, unit="source", source_key="annotator"), sketch_dim=None, null_draws=100,
        damping=DAMPING, show_progress=False,
    )  # fmt: skip
    assert report.significant and report.lambda1 > 1.5 * report.null_quantiles["0.99"]
    with torch.no_grad():
        probs = scorer.log_choice(model).exp()
    generator = torch.Generator().manual_seed(7)
    item = {p: i for i, p in enumerate(PROMPTS)}
    drawn = [
        {**row, "label": int(torch.multinomial(probs[item[row["prompt"]]], 1, generator=generator))} for row in rows
    ]
    null_report = measure_stability(
        model, tok, choice_votes(drawn, tok, unit="source", source_key="annotator"), sketch_dim=None, null_draws=100,
        damping=DAMPING, show_progress=False,
    )  # fmt: skip
    assert min(null_report.null_top) <= null_report.lambda1 < null_report.null_quantiles["0.99"]
    assert null_report.lambda1 < report.lambda1 / 1.5


def test_per_vote_units_hide_the_group_conflict_that_per_annotator_units_reveal(planted, tok):
    """The same votes, two groupings. Per vote (rows): λ₁ ≈ 1 (every prompt is 50/50 and one model serves it), not
    above the null, α stays 1. Per annotator (sources): λ₁ clears the null, a recommended α < 1, and the top
    direction's split scores put the two groups on opposite sides."""
    model, _ = planted
    rows = planted_rows()
    per_vote = measure_stability(
        model, tok, choice_votes(rows, tok, unit="row"), sketch_dim=None, null_draws=50, damping=DAMPING,
        show_progress=False,
    )  # fmt: skip
    assert per_vote.lambda1 == pytest.approx(1.0, abs=0.1)
    assert not per_vote.significant and per_vote.recommended_alpha == 1.0
    per_annotator = measure_stability(
        model, tok, choice_votes(rows, tok, unit="source", source_key="annotator"), sketch_dim=None, null_draws=50,
        damping=DAMPING, floor=0.1, show_progress=False,
    )  # fmt: skip
    assert per_annotator.significant and per_annotator.lambda1 > 3
    assert per_annotator.alpha_critical_floor < per_annotator.alpha_critical < 1
    assert per_annotator.alpha_bulk <= per_annotator.recommended_alpha < per_annotator.alpha_critical_floor
    side = dict(zip(per_annotator.unit_names, per_annotator.scores[0]))
    signs_a = {math.copysign(1, side[a]) for a in GROUP_A}
    signs_b = {math.copysign(1, side[b]) for b in GROUP_B}
    assert len(signs_a) == len(signs_b) == 1 and signs_a != signs_b


def test_sketched_gradients_approximate_the_exact_spectrum(planted, tok):
    """A count sketch of the P = 704 gradient entries into D = 256 keeps inner products in expectation: the sketched
    λ₁ of the planted conflict lies within 20 % of the exact one, and D ≥ P is exact."""
    model, _ = planted
    votes = choice_votes(planted_rows(), tok, unit="source", source_key="annotator")
    exact = spread_spectrum(gradient_table(model, tok, votes, sketch_dim=None), damping=DAMPING, null_draws=0)
    full = spread_spectrum(gradient_table(model, tok, votes, sketch_dim=10_000), damping=DAMPING, null_draws=0)
    assert full.eigenvalues[0] == pytest.approx(exact.eigenvalues[0], rel=1e-9)
    sketched = [
        spread_spectrum(gradient_table(model, tok, votes, sketch_dim=256, seed=s), damping=DAMPING, null_draws=0)
        for s in range(3)
    ]
    for spectrum in sketched:
        assert spectrum.eigenvalues[0] == pytest.approx(exact.eigenvalues[0], rel=0.2)


def test_per_example_gradients_equal_autograd_rows(tok):
    """LoraGradientCapture: each row's gradient of a batch objective equals autograd on that row alone."""
    model = tiny_lora(tok, seed=5)
    params = params_of(model)
    ids = torch.tensor([tok("What colour is the sky? It is blue.")["input_ids"][:8], tok("Say hello. Ahoy matey!")["input_ids"][:8]])
    capture = LoraGradientCapture(model, "default", sketch_dim=None)
    with capture:
        per_row = model(input_ids=ids).logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)
    ours = capture.per_example(per_row.sum(), 2, retain_graph=False)
    for row in range(2):
        single = model(input_ids=ids[row : row + 1]).logits.log_softmax(-1)[:, :-1].gather(-1, ids[row : row + 1, 1:, None]).sum()
        torch.testing.assert_close(ours[row], flat(torch.autograd.grad(single, params)), rtol=1e-9, atol=1e-12)
    assert all(p.grad is None for p in params)


def test_vote_counts_weigh_as_their_single_votes_and_redraw_as_a_multinomial(planted, tok):
    """A row with ``label_counts`` [2, 1] and weight ½ is the same data as three single-vote rows of weight ½ in one
    unit; its null redraws the three votes together, Multinomial(3, p), whose mean and variance the draws match."""
    model, _ = planted
    counted = [
        {"prompt": p, "options": OPTIONS, "label_counts": [2, 1], "weight": 0.5, "source": p} for p in PROMPTS[:4]
    ]
    single = [
        {"prompt": p, "options": OPTIONS, "label": label, "weight": 0.5, "source": p} for p in PROMPTS[:4] for label in (0, 0, 1)
    ]  # fmt: skip
    tables = [gradient_table(model, tok, choice_votes(rows, tok, unit="source"), sketch_dim=None) for rows in (counted, single)]
    spectra = [spread_spectrum(t, damping=DAMPING, null_draws=0).eigenvalues for t in tables]
    assert spectra[0] == pytest.approx(spectra[1], rel=1e-9)
    assert tables[0].num_votes == tables[1].num_votes == 12
    table = tables[0]
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([table.sample_null_counts(generator) for _ in range(4000)])  # (draws, V, C)
    assert bool((draws.sum(-1) == 3).all())
    p = table.null_probs
    torch.testing.assert_close(draws.mean(0), 3 * p, atol=0.06, rtol=0)
    torch.testing.assert_close(draws.var(0), 3 * p * (1 - p), atol=0.06, rtol=0)


def test_bad_choice_rows_are_refused_by_field(tok):
    with pytest.raises(ValueError, match=r"choice row 1 \(counting from 0\): label must be an option index"):
        choice_votes([{"prompt": "a", "options": OPTIONS, "label": 0}, {"prompt": "b", "options": OPTIONS, "label": 2}], tok)
    with pytest.raises(ValueError, match="label_counts must be non-negative whole vote counts"):
        choice_votes([{"prompt": "a", "options": OPTIONS, "label_counts": [0.5, 0.5]}], tok)
    with pytest.raises(ValueError, match=r"unit='source': row 0 \(counting from 0\) names no source in 'annotator'"):
        choice_votes([{"prompt": "a", "options": OPTIONS, "label": 0}], tok, unit="source", source_key="annotator")


def test_stability_command_on_a_group_file_writes_json_and_plot(tmp_path, tiny_model_dir, capsys):
    """``trl-renyi stability`` fits one LoRA on a group-annotated file, measures the annotators as units, prints λ₁
    against the null, α* and the recommendation, and writes stability.json and stability.png; ``--adapter`` then
    measures the saved fit again without training."""
    import json as json_module

    from tests.test_group_conflicts import two_group_rows, write
    from trl_renyi.cli import main

    data = write(tmp_path / "groups.jsonl", two_group_rows(12))
    out = tmp_path / "out"
    common = [
        "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--unit", "source",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--null_draws", "10", "--report_to", "none",
        "--gradient_checkpointing", "false", "--disable_tqdm", "true",
    ]  # fmt: skip
    assert main(["stability", *common, "--max_steps", "3", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Stability criterion over 6 source units" in printed and "recommended α" in printed
    report = json_module.loads((out / "stability.json").read_text())
    assert report["unit"] == "source" and report["num_units"] == 6 and sorted(report["unit_names"]) == [
        "g1-0", "g1-1", "g1-2", "g2-0", "g2-1", "g2-2"]  # fmt: skip
    assert len(report["null_top"]) == 10 and (out / "stability.png").stat().st_size > 0
    again = tmp_path / "again"
    assert main(["stability", *common, "--adapter", str(out / "fit"), "--output_dir", str(again)]) == 0
    repeat = json_module.loads((again / "stability.json").read_text())
    assert repeat["eigenvalues"] == pytest.approx(report["eigenvalues"], rel=1e-4)


def test_an_item_cache_measures_other_units_without_another_forward(planted, tok, monkeypatch):
    from trl_renyi.stability import gradients as gradients_module

    model, _ = planted
    cache = {}
    options = dict(sketch_dim=None, null_draws=0, damping=DAMPING, show_progress=False, item_cache=cache)
    measure_stability(model, tok, choice_votes(planted_rows(), tok, unit="source", source_key="annotator"), **options)
    fresh = measure_stability(model, tok, choice_votes(planted_rows(), tok, unit="row"), sketch_dim=None, null_draws=0,
                              damping=DAMPING, show_progress=False)  # fmt: skip

    def no_forward(*args, **kwargs):
        raise AssertionError("a cached item was scored again")

    monkeypatch.setattr(gradients_module, "_option_differences_shared", no_forward)
    cached = measure_stability(model, tok, choice_votes(planted_rows(), tok, unit="row"), **options)
    assert cached.eigenvalues == pytest.approx(fresh.eigenvalues, rel=1e-9)


def test_free_text_votes_become_choices_among_the_answers_each_prompt_gets(tok):
    """Rows that answer one prompt differently are measured as choices among those answers (exact Fisher); without a
    prompt answered two ways, the votes stay free text."""
    from trl_renyi.stability.votes import answer_choice_votes

    def row(prompt, answer):
        p, a = tok(prompt)["input_ids"], tok(answer)["input_ids"] + [tok.eos_token_id]
        return p + a, [-100] * len(p) + a

    rows = [row("Say hello.", " Ahoy!"), row("Say hello.", " Good morning."), row("Say hello.", " Ahoy!"),
            row("Count to three.", " one two three")]  # fmt: skip
    votes = SequenceVotes([r[0] for r in rows], [r[1] for r in rows], [1.0, 2.0, 1.0, 1.0], [0, 1, 0, 2], ["a", "b", "c"])
    choices = answer_choice_votes(votes)
    assert [len(o) for o in choices.option_ids] == [2, 1]
    assert choices.group_item == [0, 0, 0, 1] and choices.group_counts == [[1, 0], [0, 1], [1, 0], [1]]
    assert choices.group_weight == [1.0, 2.0, 1.0, 1.0] and choices.group_unit == [0, 1, 0, 2]
    single = SequenceVotes([rows[0][0], rows[3][0]], [rows[0][1], rows[3][1]], [1.0, 1.0], [0, 1], ["a", "b"])
    assert answer_choice_votes(single) is None


def test_the_recommendation_never_spreads_along_directions_of_one_vote_or_less():
    """The bulk edge is max(null quantile, 1): a null far below 1 (units averaging many votes) does not make every
    direction above it worth spreading along."""
    floor = 0.1
    # a null above 1 is the edge: the geometric middle of the window (1−φ)(1−α) = 1/sqrt(λ1 λ0)
    assert recommend_alpha(9.0, 4.0, floor) == pytest.approx(1 - 1 / (0.9 * 6.0))
    # a null far below 1: the edge is 1, not the null's 0.004
    assert recommend_alpha(9.0, 0.004, floor) == pytest.approx(1 - 1 / (0.9 * 3.0))
    # clears the null but not 1: keep α = 1
    assert recommend_alpha(0.8, 0.004, floor) is None and recommend_alpha(4.0, 4.0, floor) is None
    # the recommendation spreads the top direction and not the edge
    alpha = recommend_alpha(9.0, 0.004, floor)
    assert spread_is_favourable(alpha, 9.0, floor) and not spread_is_favourable(alpha, 1.0, floor)
