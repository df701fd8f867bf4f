"""The efficacy studies' --quick variants run end to end (tiny offline model) and write their results."""

import json
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture
def studies(monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    monkeypatch.syspath_prepend(str(EXPERIMENTS.parent / "benchmarks"))
    import dpo_specialisation
    import sft_specialisation

    return sft_specialisation, dpo_specialisation


def test_sft_study_quick(studies, tmp_path):
    sft, _ = studies
    assert sft.main(["--quick", "--output-dir", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "sft_specialisation.json").read_text())
    results = payload["results"]
    assert set(results) == {"single", "a-1wf"}
    single, ensemble = results["single"], results["a-1wf"]
    assert single["num_members"] == 1 and ensemble["num_members"] == 4
    # one member cannot disagree with itself: no epistemic signal, AUROC at chance
    assert single["mi_contradictory"] == 0 and single["auroc_choice_mi"] == 0.5
    for family in ("greetings", "farewells", "arithmetic", "capitals"):
        assert family in ensemble["families"]
        assert abs(sum(ensemble["families"][family]["posterior_share"]) - 1) < 1e-5
    assert 0 <= ensemble["routing_entropy"] <= 1.3863
    assert (tmp_path / "sft_specialisation_summary.png").stat().st_size > 0
    assert (tmp_path / "sft_specialisation_routing.png").stat().st_size > 0


def test_dpo_study_quick(studies, tmp_path):
    _, dpo = studies
    assert dpo.main(["--quick", "--output-dir", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "dpo_specialisation.json").read_text())
    single, ensemble = payload["results"]["single"], payload["results"]["a-1w"]
    assert single["mi_disputed"] == 0 and single["mi_agreed"] == 0
    assert not single["groups_on_different_members"]
    for group in ("A", "B"):
        assert 0 <= ensemble["groups"][group]["routed_accuracy"] <= 1
    assert (tmp_path / "dpo_specialisation.png").stat().st_size > 0
