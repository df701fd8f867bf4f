"""The efficacy studies' --quick variants run end to end (tiny offline model) and write their results."""

import json
from pathlib import Path

import pytest

from tests.helpers import run_script

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture
def studies(monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    monkeypatch.syspath_prepend(str(EXPERIMENTS.parent / "benchmarks"))
    import dpo_specialisation
    import real_data
    import sft_specialisation

    return sft_specialisation, dpo_specialisation, real_data


def test_sft_study_quick(studies, tmp_path):
    sft, _, _ = studies
    assert sft.main(["--quick", "--output-dir", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "sft_specialisation.json").read_text())
    results = payload["results"]
    assert set(results) == {"single", "a-1wf"}
    single, ensemble = results["single"], results["a-1wf"]
    assert single["num_members"] == 1 and ensemble["num_members"] == 4
    # one member cannot disagree with itself: no epistemic signal, AUROC at chance
    assert single["mi_contradictory"] == 0 and single["auroc_choice_mi"] == 0.5
    for family in ("greetings", "farewells", "opposites", "capitals"):
        assert family in ensemble["families"]
        assert abs(sum(ensemble["families"][family]["posterior_share"]) - 1) < 1e-5
    assert 0 <= ensemble["routing_entropy"] <= 1.3863
    assert (tmp_path / "sft_specialisation_summary.png").stat().st_size > 0
    assert (tmp_path / "sft_specialisation_routing.png").stat().st_size > 0


def test_dpo_study_quick(studies, tmp_path):
    _, dpo, _ = studies
    assert dpo.main(["--quick", "--output-dir", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "dpo_specialisation.json").read_text())
    single, ensemble = payload["results"]["single"], payload["results"]["a-1w"]
    assert single["mi_disputed"] == 0 and single["mi_agreed"] == 0
    assert not single["groups_on_different_members"]
    for group in ("A", "B"):
        assert 0 <= ensemble["groups"][group]["routed_accuracy"] <= 1
    assert (tmp_path / "dpo_specialisation.png").stat().st_size > 0


def test_real_data_study_quick(studies, tmp_path):
    """Both parts run on stand-in data; the results page gets its section; K = 1 models report no MI."""
    _, _, real = studies
    page = tmp_path / "results.md"
    page.write_text("# page\n\n<!-- real-data:start -->\nold\n<!-- real-data:end -->\n")
    assert real.main(["--quick", "--output-dir", str(tmp_path), "--docs", str(page)]) == 0
    payload = json.loads((tmp_path / "real_data.json").read_text())
    tqa, hh = payload["truthfulqa"]["results"], payload["hh_rlhf"]["results"]
    assert set(tqa) == {"base", "single", "a1", "a0", "defaults"} and set(hh) == {"single", "a1", "defaults"}
    for name, result in [*tqa.items(), *hh.items()]:
        assert 0 <= result["accuracy"] <= 1 and 0 <= result["ece"] <= 1 and 0 <= result["brier"] <= 2
        assert result["nll"] > 0
        has_mi = "mutual_information" in result["auroc"]
        assert has_mi == (name not in ("base", "single")), name
    assert len(hh["single"]["member_accuracy"]) == 1 and len(hh["a1"]["member_accuracy"]) == 4
    text = page.read_text()
    assert "old" not in text and "| α = 0 |" in text and "hh-rlhf harmless" in text
    assert (tmp_path / "truthfulqa_reliability.png").stat().st_size > 0
    assert (tmp_path / "hh_rlhf_reliability.png").stat().st_size > 0


def test_real_data_study_skips_without_data(studies, tmp_path, capsys):
    _, _, real = studies
    assert real.main(["--data-dir", str(tmp_path / "absent"), "--output-dir", str(tmp_path / "out")]) == 0
    assert "not found; skipping truthfulqa" in capsys.readouterr().out
    assert not (tmp_path / "out" / "real_data.json").exists()


def test_multi_annotator_benchmark_quick(tmp_path):
    out = tmp_path / "multi.json"
    script = EXPERIMENTS.parent / "benchmarks" / "bench_multi_annotator.py"
    assert run_script(script, "--quick", "--output", out, "--data", tmp_path / "absent.jsonl") == 0
    payload = json.loads(out.read_text())
    assert payload["data"].startswith("generated") and len(payload["step_times"]["expanded"]) == 3
    assert payload["shared_prompt_step_s"] > 0 and payload["ratio"] == pytest.approx(
        payload["shared_prompt_step_s"] / payload["expanded_step_s"]
    )
    assert payload["ratio_unshared"] == pytest.approx(payload["multi_annotator_step_s"] / payload["expanded_step_s"])


def test_step_profile_quick(tmp_path):
    out = tmp_path / "profile.json"
    assert run_script(EXPERIMENTS.parent / "benchmarks" / "profile_step.py", "--quick", "--output", out) == 0
    payload = json.loads(out.read_text())
    for side in ("single", "ensemble"):
        assert payload[side]["matmul"] > 0 and payload[side]["wall clock of the step"] > 0


@pytest.mark.parametrize(
    "flags,expected", [({"avx512f", "avx2"}, False), ({"avx512f", "avx512_bf16"}, True), ({"amx_bf16"}, True), (set(), False)]
)
def test_auto_precision_is_bf16_only_where_the_cpu_multiplies_it_natively(monkeypatch, flags, expected):
    """oneDNN accepts bfloat16 on any AVX512 CPU but emulates it without AVX512-BF16 / AMX (five times slower than
    float32 there): the studies' ``--precision auto`` reads the instruction set, not oneDNN's flag."""
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    monkeypatch.syspath_prepend(str(EXPERIMENTS.parent / "benchmarks"))
    import runs

    monkeypatch.setattr(runs.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runs, "cpu_flags", lambda: flags)
    assert runs.native_bf16() is expected
    assert runs.resolve_precision("auto") is expected
    assert runs.resolve_precision("fp32") is False and runs.resolve_precision("bf16") is True
