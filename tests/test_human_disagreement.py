"""The human-disagreement study runs end to end (``--quick``: tiny model, a few items) on every ChaosNLI part."""

import json
import random
import sys
from pathlib import Path

import pytest

from tests.helpers import run_script

REPO = Path(__file__).resolve().parents[1]
SHARED_SNLI = REPO.parent / "shared" / "data" / "chaosnli-snli.jsonl"
METRICS = (
    "jsd", "kl", "accuracy", "spearman_mi_human_entropy", "spearman_entropy_human_entropy", "auroc_mi_contested",
    "selective_accuracy_50",
)  # fmt: skip


def nli_row(i, rng):
    counts = [rng.randint(0, 60) for _ in range(3)]
    counts[i % 3] += 40
    scale = 100 / sum(counts)
    counts = [round(c * scale) for c in counts]
    counts[0] += 100 - sum(counts)
    votes = rng.choices(["entailment", "neutral", "contradiction"], weights=[c + 1 for c in counts], k=5)
    return {
        "uid": f"mnli-{i}", "label_count": counts, "label_dist": [c / 100 for c in counts],
        "majority_label": "enc"[counts.index(max(counts))],
        "example": {"uid": f"mnli-{i}", "premise": f"A person number {i} walks.", "hypothesis": "Someone moves."},
        "old_label": votes[0][0], "old_labels": votes,
    }  # fmt: skip


def anli_row(i, rng):
    first = rng.randint(5, 95)
    return {
        "uid": f"anli-{i}", "label_count": [first, 100 - first], "label_dist": [first / 100, 1 - first / 100],
        "majority_label": 1 if first >= 50 else 2,
        "example": {"uid": f"anli-{i}", "obs1": "Ann went out.", "obs2": "She came back wet.", "hyp1": "It rained.",
                    "hyp2": f"She read book {i}."},
        "old_label": rng.choice([1, 2]),
    }  # fmt: skip


def run_study(data, out, *extra):
    script = REPO / "experiments" / "human_disagreement.py"
    assert run_script(script, "--data", data, "--output_dir", out, "--quick", *extra) == 0
    return json.loads((out / "human_disagreement.json").read_text())


@pytest.mark.parametrize("part, make_row", [("mnli", nli_row), ("anli", anli_row)])
def test_the_study_runs_unchanged_on_every_chaosnli_part(part, make_row, tmp_path):
    rng = random.Random(0)
    data = tmp_path / f"chaosnli-{part}.jsonl"
    data.write_text("".join(json.dumps(make_row(i, rng)) + "\n" for i in range(24)))
    settings = "base,single,alpha1,default,default_row"
    payload = run_study(data, tmp_path / "out", "--settings", settings, "--train_labels", "sampled:5")
    assert payload["part"] == ("nli" if part == "mnli" else "anli")
    assert set(payload["settings"]) == set(settings.split(","))
    for name, metrics in payload["settings"].items():
        assert set(METRICS) <= set(metrics), name
        assert 0.0 <= metrics["jsd"] <= 1.0 and metrics["kl"] >= 0.0 and 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["audit_top"] == 12 and 0.0 <= metrics["audit_precision_at_100"] <= 1.0  # 12 training items
    assert payload["settings"]["single"]["mean_mi"] == pytest.approx(0.0, abs=1e-9)  # one member: no disagreement
    assert all(Path(p).is_file() for p in payload["plots"].values())


def test_the_study_on_the_shared_snli_file(tmp_path):
    if not SHARED_SNLI.is_file():
        pytest.skip(f"{SHARED_SNLI} is absent")
    payload = run_study(SHARED_SNLI, tmp_path / "out", "--settings", "independent,default")
    assert payload["part"] == "nli" and set(payload["settings"]) == {"independent", "default"}
    assert payload["settings"]["independent"]["audit_top"] == 12


def test_a_row_in_the_wrong_format_is_named(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"uid": "x", "label_count": [1, 2, 3], "example": {"text": "no premise"}}) + "\n")
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        from human_disagreement import read_items
    finally:
        sys.path.remove(str(REPO / "experiments"))
    with pytest.raises(ValueError, match=r"bad.jsonl, line 1: not a ChaosNLI row"):
        read_items(data)
