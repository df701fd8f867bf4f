"""The demo pipeline end to end at reduced size on the tiny model, checked against an independent recomputation."""

import json
import math

import pytest
import torch

from trl_renyi import RenyiEnsemble
from trl_renyi.cli.demo import DemoConfig
from trl_renyi.data import FAMILIES, chat_answer, chat_prompt, held_out_items
from trl_renyi.evaluation.families import FamilyReport, uncertainty_gap


def choice_mutual_information(member_loglik, weights):
    """MI over two choices from (2, K) sequence log-likelihoods, written out: H[Σ π p_k] − Σ π H[p_k]."""
    p = torch.softmax(member_loglik.double().T, dim=-1)  # (K, 2), each member's choice distribution
    w = torch.tensor(weights, dtype=torch.float64)
    mixture = (w[:, None] * p).sum(0)
    entropy = lambda q: -(q * q.clamp_min(1e-300).log()).sum(-1)  # noqa: E731
    return float(entropy(mixture) - (w * entropy(p)).sum())


def test_demo_pipeline_end_to_end(make_model, tokenizer, tmp_path):
    from trl_renyi.cli.demo import run_demo

    printed = []
    result = run_demo(
        model=make_model(),
        tokenizer=tokenizer,
        output_dir=str(tmp_path / "demo"),
        num_members=2,
        max_steps=3,
        batch_size=4,
        alpha_warmup_ratio=0.34,
        num_test_per_family=2,
        show_per_family=1,
        max_new_tokens=3,
        print_fn=printed.append,
    )
    text = "\n".join(printed)
    families = list(DemoConfig().families)

    # (a) routing table: one row per (family, convention), shares sum to one
    expected_rows = {f"{f}/{c}" for f in families for c in FAMILIES[f].conventions}
    assert set(result.routing) == expected_rows
    for shares in result.routing.values():
        assert len(shares) == 2 and math.isclose(sum(shares), 1.0, rel_tol=1e-5)
    assert "Routing table" in text and "greetings/pirate" in text

    # recompute the choice-level MI independently from the saved ensemble
    ensemble = RenyiEnsemble.from_pretrained(str(result.ensemble_dir), base_model=make_model())
    items = held_out_items(2, families, seed=0)
    reports = {r.family: r for r in result.families}
    assert set(reports) == set(families)
    for family, family_items in items.items():
        values, token_mi, spread = [], [], []
        for item in family_items:
            prompt = chat_prompt(item.prompt, DemoConfig().system_prompt)
            scores = ensemble.score([prompt, prompt], [chat_answer(c) for c in item.choices])
            values.append(choice_mutual_information(scores.member_loglik, ensemble.member_weights))
            refs = range(len(item.answers))  # the answers the training data gives this prompt
            token_mi.append(sum(float(scores.mutual_information_max[r]) for r in refs) / len(refs))
            spread.append(sum(float(scores.member_loglik[r].std(unbiased=False)) for r in refs) / len(refs))
        assert reports[family].choice_mi == pytest.approx(sum(values) / len(values), abs=1e-4)
        assert reports[family].contradictory == FAMILIES[family].contradictory
        assert reports[family].token_mi_max == pytest.approx(sum(token_mi) / len(token_mi), rel=1e-3, abs=1e-5)
        assert reports[family].loglik_std == pytest.approx(sum(spread) / len(spread), rel=1e-3, abs=1e-4)
    contra = [reports[f].choice_mi for f in families if FAMILIES[f].contradictory]
    assert result.gap["choice_mi"][0] == pytest.approx(sum(contra) / len(contra))
    assert "Uncertainty gap" in text

    # (b) answers of every member and of the mixture for one held-out prompt per family
    assert {(a["family"], a["source"]) for a in result.answers} == {
        (f, s) for f in families for s in ["member_0", "member_1", "mixture"]
    }
    row = result.answers[0]
    prompt = chat_prompt(row["prompt"], DemoConfig().system_prompt)
    answered = ensemble.score([prompt], [chat_answer(row["answer"] or " ")])
    assert row["loglik_std"] == pytest.approx(float(answered.member_loglik.std(unbiased=False)), abs=1e-3)

    # (c) what was written, and where
    for name in ("member_0", "member_1"):
        assert (result.ensemble_dir / name / "adapter_model.safetensors").is_file()
    card = result.model_card.read_text()
    assert "## Evaluation" in card and "greetings (contradictory)" in card and "| members K | 2 |" in card
    for plot in result.plots:
        assert plot.read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert saved["routing"].keys() == result.routing.keys()
    for key, shares in result.routing.items():
        assert saved["routing"][key] == pytest.approx(shares)
    assert str(result.model_card) in text and "Time:" in text
    assert 0 < result.train_seconds <= result.wall_seconds


def test_uncertainty_gap_averages_each_kind_of_family():
    reports = [
        FamilyReport("greetings", True, 0.6, 1.0, 5.0, None),
        FamilyReport("farewells", True, 0.4, 0.8, 3.0, None),
        FamilyReport("arithmetic", False, 0.1, 0.2, 1.0, 1.0),
    ]
    gap = uncertainty_gap(reports)
    assert gap["choice_mi"] == pytest.approx((0.5, 0.1))
    assert gap["token_mi_max"] == pytest.approx((0.9, 0.2))
    assert gap["loglik_std"] == pytest.approx((4.0, 1.0))


def test_demo_command_line_and_validation(tmp_path):
    from trl import TrlParser

    config_file = tmp_path / "demo.yaml"
    config_file.write_text("max_steps: 7\nalpha: 0.0\nfamilies: [greetings, arithmetic]\n")
    (config,) = TrlParser((DemoConfig,)).parse_args_and_config(
        ["--config", str(config_file), "--num_members", "3", "--output_dir", str(tmp_path)]
    )
    assert (config.max_steps, config.alpha, config.num_members) == (7, 0.0, 3)
    assert config.families == ["greetings", "arithmetic"]
    with pytest.raises(ValueError, match="families"):
        DemoConfig(families=["greetings", "limericks"])
    with pytest.raises(ValueError, match="max_steps"):
        DemoConfig(max_steps=0)
