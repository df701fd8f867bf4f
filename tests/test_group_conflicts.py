"""Group-annotated data (trl_renyi.data.group_conflicts), its metrics (trl_renyi.evaluation.group_conflicts) against
SciPy / scikit-learn, and the study (experiments/group_conflicts.py --quick) on rows written here."""

import json
import math
from pathlib import Path

import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy, spearmanr
from sklearn.metrics import roc_auc_score

from trl_renyi.data.group_conflicts import (
    annotator_vote_rows,
    group_targets,
    group_vote_rows,
    pooled_vote_rows,
    preference_pairs,
    read_group_items,
    stratified_split,
)
from trl_renyi.evaluation.distributions import spearman
from trl_renyi.evaluation.group_conflicts import (
    alignment_matrix,
    best_members,
    contested_auroc,
    contested_vs_split_auroc,
    group_alignment,
    group_cross_entropy,
    split_agreed_mask,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "group-conflicts"
OPTIONS = ["Strongly agree", "Agree", "Neutral", "Disagree", "Strongly disagree"]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def two_group_rows(n=24, annotators=True):
    """Two groups, five options; every third item contested (g1 says option 0, g2 option 3)."""
    rows = []
    for i in range(n):
        contested = i % 3 == 0
        g1 = [1200, 300, 10, 0, 1] if contested else [600, 500, 100, 0, 0]
        g2 = [5, 20, 40, 900, 12] if contested else [700, 450, 90, 3, 1]
        row = {"id": f"q{i}", "prompt": f"Question {i}: how do you feel about topic {i}?", "options": OPTIONS,
               "groups": {"g1": g1, "g2": g2}, "split": "W1"}
        if annotators:
            row["groups"] = {"g1": [2, 1, 0, 0, 0] if not contested else [3, 0, 0, 0, 0],
                             "g2": [2, 1, 0, 0, 0] if not contested else [0, 0, 0, 3, 0]}
            votes = {"g1": [0, 0, 1] if not contested else [0, 0, 0], "g2": [0, 1, 0] if not contested else [3, 3, 3]}
            row["annotations"] = [{"annotator": f"{g}-{j}", "group": g, "option": o}
                                  for g in ("g1", "g2") for j, o in enumerate(votes[g])]
        rows.append(row)
    return rows


def three_group_rows(n=18):
    rows = []
    for i in range(n):
        options = ["yes", "no", "unsure"][: 2 + i % 2]
        if i % 2:
            groups = {"a": [5, 1, 0], "b": [0, 6, 1], "c": [1, 1, 7]}
        else:
            groups = {"a": [4, 2], "b": [3, 1], "c": [9, 2]}
        rows.append({"id": str(i), "prompt": f"Statement {i}. Agree?", "options": options,
                     "groups": {g: v[: len(options)] for g, v in groups.items()}})
    return rows


# --------------------------------------------------------------------------------------------------------- reader
def test_reader_any_options_groups_and_counts(tmp_path):
    items = read_group_items(write(tmp_path / "three.jsonl", three_group_rows()))
    assert len(items) == 18 and {len(i.options) for i in items} == {2, 3}
    assert items[1].contested and not items[0].contested
    big = read_group_items(write(tmp_path / "two.jsonl", two_group_rows(annotators=False)))
    assert big[0].groups["g1"][0] == 1200.0 and big[0].contested


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda r: r.pop("options"), "missing field 'options'"),
        (lambda r: r.update(options=["only"]), "at least 2 answer strings"),
        (lambda r: r.update(options=["a", None, "c", "d", "e"]), r"'options'\[1\] must be a non-empty string"),
        (lambda r: r.update(prompt=None), "'prompt' must be a non-empty string"),
        (lambda r: r["groups"].update(g1=[1, 2]), r"'groups'\['g1'\] must hold 5 vote counts"),
        (lambda r: r["groups"].update(g2=[1, -1, 0, 0, 0]), "non-negative finite counts"),
        (lambda r: r["groups"].update(g2=[0, 0, 0, 0, 0]), r"'groups'\['g2'\] has no votes"),
        (lambda r: r.update(groups={"g1": [1, 0, 0, 0, 0]}), "at least 2 group names"),
        (lambda r: r["annotations"][0].update(option=7), r"'annotations'\[0\]: 'option' must be an index"),
        (lambda r: r["annotations"][1].update(group="g9"), "group 'g9' is not one of"),
    ],
)
def test_reader_names_file_line_and_field(tmp_path, change, message):
    rows = two_group_rows(4)
    change(rows[2])
    path = write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=rf"bad\.jsonl, line 3: .*{message}"):
        read_group_items(path)


def test_reader_refuses_bad_json_duplicates_other_groups_and_empty(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(two_group_rows(1)[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match="x.jsonl, line 2: not valid JSON"):
        read_group_items(path)
    rows = two_group_rows(2)
    rows[1]["id"] = rows[0]["id"]
    with pytest.raises(ValueError, match="line 2: id 'q0' already used on line 1"):
        read_group_items(write(path, rows))
    rows = two_group_rows(2, annotators=False)
    rows[1]["groups"] = {"g1": rows[1]["groups"]["g1"], "other": rows[1]["groups"]["g2"]}
    with pytest.raises(ValueError, match="line 2: groups .* differ"):
        read_group_items(write(path, rows))
    path.write_text("\n")
    with pytest.raises(ValueError, match="holds no items"):
        read_group_items(path)


# ---------------------------------------------------------------------------------------------------- row builders
def test_rows_carry_no_group_names(tmp_path):
    items = read_group_items(write(tmp_path / "two.jsonl", two_group_rows()))
    for rows in (group_vote_rows(items), pooled_vote_rows(items), preference_pairs(items)):
        text = json.dumps(rows)
        assert '"g1' not in text and '"g2' not in text  # neither a group name nor an annotator id named after one
        assert "group" not in rows
    annotator_text = json.dumps({k: v for k, v in annotator_vote_rows(items).items() if k != "annotator"})
    assert '"g1' not in annotator_text and '"g2' not in annotator_text
    # annotator ids are people, not groups: they are kept, the group field is not
    annotator = annotator_vote_rows(items)
    assert set(annotator) == {"prompt", "completions", "completion_weights", "annotator"}


def test_group_vote_rows_are_each_groups_distribution(tmp_path):
    items = read_group_items(write(tmp_path / "two.jsonl", two_group_rows(annotators=False)))
    rows = group_vote_rows(items, seed=3)
    assert len(rows["prompt"]) == 2 * len(items)
    first = items[0]
    expected = sorted(
        tuple(round(w, 9) for w in first.distribution(g) if w > 0) for g in first.groups
    )
    found = sorted(
        tuple(round(w, 9) for w in weights)
        for p, weights in zip(rows["prompt"], rows["completion_weights"])
        if p.startswith(first.prompt)
    )
    assert found == expected
    counts = group_vote_rows(items, weighting="counts")
    assert max(max(w) for w in counts["completion_weights"]) == 1200.0
    pooled = pooled_vote_rows(items)
    assert all(abs(sum(w) - 2.0) < 1e-9 for w in pooled["completion_weights"])  # two groups, each weighing 1


def test_annotator_rows_one_completion_per_vote(tmp_path):
    items = read_group_items(write(tmp_path / "two.jsonl", two_group_rows()))
    rows = annotator_vote_rows(items)
    assert [len(c) for c in rows["completions"]] == [6] * len(items)
    assert rows["annotator"][0] == ["g1-0", "g1-1", "g1-2", "g2-0", "g2-1", "g2-2"]
    assert rows["completions"][0] == [" Strongly agree"] * 3 + [" Disagree"] * 3
    no_ids = read_group_items(write(tmp_path / "plain.jsonl", two_group_rows(annotators=False)))
    with pytest.raises(ValueError, match="names no annotators"):
        annotator_vote_rows(no_ids)


def test_preference_pairs_swap_on_contested_and_agree_on_agreed(tmp_path):
    items = read_group_items(write(tmp_path / "three.jsonl", three_group_rows()))
    pairs = preference_pairs(items)
    by_prompt = {}
    for p, c, r in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"]):
        by_prompt.setdefault(p, []).append((c, r))
    for item in items:
        found = by_prompt[item.prompt.rstrip() + "\nAnswer:"]
        assert len(found) == 3
        if item.contested:
            chosen = {c for c, _ in found}
            assert chosen == {" yes", " no", " unsure"}
            assert all(r in chosen and r != c for c, r in found)  # every rejected answer is another group's chosen
        else:
            assert len(set(found)) == 1 and found[0][0] == " yes"


def test_stratified_split_keeps_the_contested_share(tmp_path):
    items = read_group_items(write(tmp_path / "two.jsonl", two_group_rows(30, annotators=False)))
    train, held = stratified_split(items, 0.3, seed=1)
    assert len(train) + len(held) == 30 and not {i.id for i in train} & {i.id for i in held}
    assert sum(i.contested for i in held) == 3 and len(held) == 9
    assert stratified_split(items, 0.3, seed=1)[1] == held


# ----------------------------------------------------------------------------------------- targets and metrics
def test_targets_against_scipy(tmp_path):
    items = read_group_items(write(tmp_path / "three.jsonl", three_group_rows()))
    for item in items[:4]:
        t = group_targets(item)
        dists = [item.distribution(g) for g in item.groups]
        mean = [sum(v) / 3 for v in zip(*dists)]
        assert t["within_group_entropy"] == pytest.approx(sum(entropy(d) for d in dists) / 3)
        assert t["between_group_jsd"] == pytest.approx(entropy(mean) - sum(entropy(d) for d in dists) / 3, abs=1e-12)
    two = read_group_items(write(tmp_path / "two.jsonl", two_group_rows(annotators=False)))
    for item in two[:3]:
        p, q = item.distribution("g1"), item.distribution("g2")
        assert group_targets(item)["between_group_jsd"] == pytest.approx(jensenshannon(p, q) ** 2, abs=1e-12)


def test_metrics_against_sklearn_and_scipy():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(40, generator=generator).tolist()
    contested = [i % 4 == 0 for i in range(40)]
    assert contested_auroc(scores, contested) == pytest.approx(roc_auc_score(contested, scores))
    assert contested_auroc([0.0] * 40, contested) == pytest.approx(0.5)
    within = torch.rand(40, generator=generator).tolist()
    split = split_agreed_mask(contested, within)
    keep = [i for i in range(40) if contested[i] or split[i]]
    assert contested_vs_split_auroc(scores, contested, within) == pytest.approx(
        roc_auc_score([contested[i] for i in keep], [scores[i] for i in keep])
    )
    jsd = torch.rand(40, generator=generator).tolist()
    assert spearman(scores, jsd) == pytest.approx(spearmanr(scores, jsd).statistic)


def test_best_member_alignment_and_group_nll():
    # member 0 answers like group a (option 0), member 1 like group b (option 1), on every item
    member_probs = [torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64)] * 3
    dists = {"a": [[1.0, 0.0]] * 3, "b": [[0.0, 1.0]] * 3}
    best = best_members(member_probs, dists)
    assert best == {"a": 0, "b": 1}
    assert group_alignment(member_probs, {"a": [0, 0, 0], "b": [1, 1, 1]}, best) == 1.0
    assert alignment_matrix(member_probs, {"a": [0, 0, 0], "b": [1, 1, 1]}) == [[1.0, 0.0], [0.0, 1.0]]
    # one member can be right for at most one group per contested item
    single = [torch.tensor([[0.6, 0.4]], dtype=torch.float64)] * 3
    assert group_alignment(single, {"a": [0, 0, 0], "b": [1, 1, 1]}, best_members(single, dists)) == 0.5
    nll = group_cross_entropy({"a": [[0.9, 0.1]] * 3, "b": [[0.2, 0.8]] * 3}, dists)
    expected = (entropy([1, 0]) + entropy([1, 0], [0.9, 0.1]) + entropy([0, 1]) + entropy([0, 1], [0.2, 0.8])) / 2
    assert nll == pytest.approx(expected) == pytest.approx((-math.log(0.9) - math.log(0.8)) / 2)


# -------------------------------------------------------------------------------------------------------- the study
def run_study(tmp_path, data, *flags):
    import subprocess
    import sys

    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "group_conflicts.py"), "--data", str(data), "--output_dir", str(out),
         "--quick", *flags],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Quick smoke test: a tiny random model, numbers meaningless." in result.stdout  # says what it is for
    return json.loads((out / "group_conflicts.json").read_text()), out


def test_quick_says_in_its_help_that_it_is_a_smoke_test():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(REPO / "experiments" / "group_conflicts.py"), "--help"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0
    assert "a smoke test of the pipeline, not a measurement: a tiny random offline model" in " ".join(result.stdout.split())


def test_study_quick_two_groups_many_options_with_annotators(tmp_path):
    data = write(tmp_path / "two.jsonl", two_group_rows())
    payload, out = run_study(tmp_path, data, "--settings", "base,single,default_source")
    settings = payload["settings"]
    assert set(settings) == {"base", "single", "default_source"}
    for name in ("single", "base"):  # one member: MI is 0, so its AUROC is 0.5
        assert settings[name]["auroc_mi_contested"] == pytest.approx(0.5)
    for key in ("auroc_mi_contested", "auroc_entropy_contested", "auroc_mi_contested_vs_split",
                "auroc_entropy_contested_vs_split", "group_alignment", "best_member_group_nll", "group_nll",
                "train_auroc_mi_contested", "mixture_nll", "pooled_jsd", "accuracy", "ece", "seconds",
                "train_seconds", "eval_seconds"):  # fmt: skip
        assert key in settings["default_source"], key
    assert (out / "mi_vs_group_jsd.png").stat().st_size > 0 and (out / "alignment.png").stat().st_size > 0


def test_study_quick_three_groups_without_annotators_and_eval_data(tmp_path):
    train = write(tmp_path / "three.jsonl", three_group_rows())
    held = write(tmp_path / "three_eval.jsonl", three_group_rows(6))
    page = tmp_path / "results.md"
    page.write_text("# Results\n\n<!-- group-conflicts-three-sft-gemma3-270m:start -->\nother model\n"
                    "<!-- group-conflicts-three-sft-gemma3-270m:end -->\n")  # fmt: skip
    payload, _ = run_study(
        tmp_path, train, "--eval_data", str(held), "--settings", "single,default_row,default_source", "--docs", str(page)
    )
    assert set(payload["settings"]) == {"single", "default_row"}  # no annotator ids: default_source is skipped
    assert payload["items"]["held_out"] == 6 and payload["groups"] == ["a", "b", "c"]
    text = page.read_text()  # the run's table went into its own section and left another model's alone
    section = text.split("<!-- group-conflicts-three-sft:start -->")[1].split("<!-- group-conflicts-three-sft:end -->")[0]
    assert "| single |" in section and "| default_row |" in section and "other model" in text


def load_study():
    """experiments/group_conflicts.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("group_conflicts_study", REPO / "experiments" / "group_conflicts.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    return study


def test_a_results_section_per_data_file_trainer_and_base_model():
    study = load_study()
    assert study.docs_marker("x/opinionqa-ideology.jsonl", "sft", "default") == "group-conflicts-opinionqa-ideology-sft"
    assert study.docs_marker("x/a.jsonl", "dpo", "smollm2-135m-instruct") == "group-conflicts-a-dpo"
    assert study.docs_marker("x/a.jsonl", "sft", "gemma3-270m") == "group-conflicts-a-sft-gemma3-270m"
    assert study.docs_marker("a.jsonl", "sft", "Org/Model_1B") == "group-conflicts-a-sft-org-model-1b"
    assert study.docs_marker("x/a.jsonl", "sft", "default", seeds=True) == "group-conflicts-a-sft-seeds"


def test_earlier_settings_kept_across_options_that_do_not_change_results(tmp_path):
    """A later run adds its settings to a folder's earlier ones unless the data or sizes differ; where to write, what
    to run and options the earlier run did not have yet (``render`` here) do not discard them."""
    study = load_study()
    path = tmp_path / "group_conflicts.json"
    earlier = {"data": "a.jsonl", "max_train_items": 320, "seed": 0, "precision": "bf16", "settings": ["single"],
               "output_dir": "/elsewhere", "docs": None}  # fmt: skip
    path.write_text(json.dumps({"config": earlier, "settings": {"single": {"lewidi_ce": 0.4}}}))
    later = {**earlier, "settings": ["alpha1"], "output_dir": str(tmp_path), "docs": "docs/results.md", "render": False}
    assert study.earlier_results(path, later) == {"single": {"lewidi_ce": 0.4}}
    for key, value in (("max_train_items", 176), ("precision", "fp32"), ("seed", 1)):
        assert study.earlier_results(path, {**later, key: value}) == {}, key
    assert study.earlier_results(tmp_path / "absent.json", later) == {}


def test_study_quick_dpo(tmp_path):
    data = write(tmp_path / "two.jsonl", two_group_rows(annotators=False))
    payload, _ = run_study(tmp_path, data, "--trainer", "dpo", "--settings", "single,default")
    assert set(payload["settings"]) == {"single", "default"}
    assert 0.0 <= payload["settings"]["default"]["group_alignment"] <= 1.0


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/group-conflicts is absent")
def test_shared_files_read_with_their_documented_counts():
    brexit = read_group_items(SHARED / "hs-brexit.jsonl")
    assert len(brexit) == 952 and sum(i.contested for i in brexit) == 169
    assert len(annotator_vote_rows(brexit)["prompt"]) == 952
    opinion = read_group_items(SHARED / "opinionqa-ideology.jsonl")
    assert len(opinion) == 377 and sum(i.contested for i in opinion) == 117


# ------------------------------------------------------------------------------------------- the field's own scores
def test_lewidi_cross_entropy_and_f1_against_a_hand_computation():
    """LeWiDi 2023's scorer: predictions clipped to [1e-12, 1 − 1e-12], then −Σ t ln(p + 1e-9), averaged over items;
    micro-F1 against the majority (a 3-3 tie goes to the first option)."""
    from trl_renyi.evaluation.group_conflicts import lewidi_cross_entropy, majority_label, micro_f1

    targets = [[0.5, 0.5], [1.0, 0.0], [1 / 6, 5 / 6]]
    predicted = [[0.7, 0.3], [0.0, 1.0], [0.2, 0.8]]  # a 0/1 prediction, clipped before the log
    by_hand = -(
        (0.5 * math.log(0.7 + 1e-9) + 0.5 * math.log(0.3 + 1e-9))
        + (1.0 * math.log(1e-12 + 1e-9) + 0.0 * math.log(1 - 1e-12 + 1e-9))
        + (1 / 6 * math.log(0.2 + 1e-9) + 5 / 6 * math.log(0.8 + 1e-9))
    ) / 3
    assert lewidi_cross_entropy(targets, predicted) == pytest.approx(by_hand, rel=1e-12)
    assert lewidi_cross_entropy(targets, targets) < lewidi_cross_entropy(targets, predicted)
    gold = [majority_label(t) for t in targets]
    assert gold == [0, 0, 1]
    from sklearn.metrics import f1_score

    guesses = [majority_label(p) for p in predicted]
    assert micro_f1(gold, guesses) == pytest.approx(f1_score(gold, guesses, average="micro"))


def test_per_annotator_macro_f1_against_sklearn():
    """Each annotator's member is the one that explains their training votes best; their held-out labels are then
    predicted by it and scored by macro-F1 (sklearn's), averaged over annotators."""
    from sklearn.metrics import f1_score

    from trl_renyi.evaluation.group_conflicts import per_annotator_macro_f1

    # member 0 says option 0, member 1 says option 1, on every item
    member_probs = [torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64)] * 6
    train_votes = [[("a", 0), ("b", 1)]] * 3 + [[("a", 0), ("b", 0)]] * 3  # a follows member 0, b mostly member 1
    held_votes = [[("a", 0), ("b", 1)], [("a", 1), ("b", 1)], [("a", 0), ("b", 0)], [("a", 0), ("b", 1)]]
    result = per_annotator_macro_f1(member_probs, train_votes, member_probs[:4], held_votes)
    # b: 3·ln 0.8 + 3·ln 0.2 under member 1 beats 3·ln 0.1 + 3·ln 0.9 under member 0
    assert result["members"] == {"a": 0, "b": 1}
    expected = {
        "a": f1_score([0, 1, 0, 0], [0, 0, 0, 0], average="macro"),
        "b": f1_score([1, 1, 0, 1], [1, 1, 1, 1], average="macro"),
    }
    assert result["annotators"] == pytest.approx(expected)
    assert result["mean"] == pytest.approx(sum(expected.values()) / 2)


def test_training_prior_is_the_mean_training_share_per_option_position():
    from trl_renyi.evaluation.group_conflicts import training_prior

    prior = training_prior([[0.8, 0.2], [0.6, 0.4], [0.2, 0.3, 0.5]], [2, 3])
    means = [(0.8 + 0.6 + 0.2) / 3, (0.2 + 0.4 + 0.3) / 3, 0.5]  # per position, over the items that have it
    assert prior[0] == pytest.approx([means[0] / sum(means[:2]), means[1] / sum(means[:2])])
    assert prior[1] == pytest.approx([m / sum(means) for m in means])


def annotated_items(conventions: dict[str, int], n=30, seed=0):
    """Items answered by annotators of several groups: each group has a convention (the option it prefers), its
    annotators follow it 85 % of the time, otherwise pick another option."""
    import random

    from trl_renyi.data.group_conflicts import GroupItem

    rng = random.Random(seed)
    items = []
    for i in range(n):
        annotations, groups = [], {g: [0, 0, 0] for g in {g for g, _ in conventions}}
        for group, annotator_index in conventions:
            preferred = (i + annotator_index * 0 + sorted(groups).index(group)) % 3 if i % 2 else 0
            option = preferred if rng.random() < 0.85 else rng.choice([o for o in range(3) if o != preferred])
            annotations.append((f"ann{annotator_index}", group, option))
            groups[group][option] += 1
        items.append(GroupItem(f"i{i}", f"Item {i}?", ["x", "y", "z"], groups, annotations))
    return items


def test_agreement_clustering_recovers_planted_annotator_groups():
    """Three groups of three annotators with conventions of their own: Cohen's κ within a group beats κ across, and
    average-linkage clustering into three clusters returns the planted groups (names unseen)."""
    from sklearn.metrics import cohen_kappa_score

    from trl_renyi.evaluation.group_conflicts import annotator_agreement, cohen_kappa, cluster_annotators

    planted = [("red", 0), ("red", 1), ("red", 2), ("blue", 3), ("blue", 4), ("blue", 5), ("green", 6), ("green", 7), ("green", 8)]
    items = annotated_items(planted, n=60)
    names, kappa = annotator_agreement(items)
    labels = {a: [o for item in items for name, _, o in item.annotations if name == a] for a in names}
    assert kappa[0][1] == pytest.approx(cohen_kappa_score(labels[names[0]], labels[names[1]]))
    assert cohen_kappa([0, 1, 1, 0], [0, 1, 0, 0]) == pytest.approx(cohen_kappa_score([0, 1, 1, 0], [0, 1, 0, 0]))
    clusters = cluster_annotators(items, 3)
    group_of = {f"ann{i}": g for g, i in planted}
    found = {frozenset(a for a, c in clusters.items() if c == k) for k in set(clusters.values())}
    truth = {frozenset(a for a, g in group_of.items() if g == name) for name in ("red", "blue", "green")}
    assert found == truth


def test_chance_share_of_contested_items_against_an_exact_permutation():
    """With three votes a group many items are contested by chance: the dealt-at-random share matches the exact
    average over every way of dealing each item's six votes into two groups of three."""
    import itertools

    from trl_renyi.data.group_conflicts import GroupItem
    from trl_renyi.evaluation.group_conflicts import chance_contested_share

    items = [
        GroupItem("a", "a?", ["no", "yes"], {"t": [3, 0], "c": [1, 2]}),
        GroupItem("b", "b?", ["no", "yes"], {"t": [2, 1], "c": [2, 1]}),
        GroupItem("c", "c?", ["no", "yes", "maybe"], {"t": [1, 1, 1], "c": [0, 2, 1]}),
    ]

    def exact(item):
        votes = [c for counts in item.groups.values() for c, n in enumerate(counts) for _ in range(int(n))]
        outcomes = []
        for first in itertools.combinations(range(len(votes)), 3):
            dealt = {"t": [0] * len(item.options), "c": [0] * len(item.options)}
            for k, option in enumerate(votes):
                dealt["t" if k in first else "c"][option] += 1
            outcomes.append(GroupItem("x", "x", item.options, dealt).contested)
        return sum(outcomes) / len(outcomes)

    expected = sum(exact(item) for item in items) / len(items)
    assert chance_contested_share(items, draws=4000, seed=1) == pytest.approx(expected, abs=0.02)


def many_group_rows(groups: int, n=15):
    """``groups`` groups of two annotators; group g prefers option g mod 3 on odd items, all prefer 0 on even ones."""
    rows = []
    for i in range(n):
        names = [f"g{g}" for g in range(groups)]
        counts, annotations = {}, []
        for g, name in enumerate(names):
            option = g % 3 if i % 2 else 0
            counts[name] = [2 if c == option else 0 for c in range(3)]
            annotations += [{"annotator": f"{name}-{j}", "group": name, "option": option} for j in range(2)]
        rows.append({"id": f"q{i}", "prompt": f"Case {i}: which?", "options": ["first", "second", "third"],
                     "groups": counts, "annotations": annotations})  # fmt: skip
    return rows


@pytest.mark.parametrize("groups", [3, 5])
def test_study_quick_with_more_groups_clusters_and_auto(tmp_path, groups):
    data = write(tmp_path / f"g{groups}.jsonl", many_group_rows(groups))
    payload, _ = run_study(tmp_path, data, "--settings", "single,cluster,auto_source")
    settings = payload["settings"]
    assert payload["groups"] == [f"g{g}" for g in range(groups)]
    assert set(settings) == {"single", "cluster", "auto_source"}
    assert len(set(settings["cluster"]["clusters"].values())) == groups
    assert 0.0 <= settings["cluster"]["cluster_purity"] <= 1.0
    for name in settings:
        assert 0.0 <= settings[name]["annotator_macro_f1"] <= 1.0 and settings[name]["lewidi_ce"] > 0
    anchors = payload["anchors"]
    assert anchors["oracle_lewidi_ce"] <= anchors["prior_lewidi_ce"]
    assert 0.0 <= anchors["contested_share_by_chance"] <= 1.0


def test_study_quick_over_seeds_reports_mean_and_sd(tmp_path):
    data = write(tmp_path / "two.jsonl", two_group_rows())
    payload, out = run_study(tmp_path, data, "--settings", "single", "--seeds", "0,1")
    assert payload["seeds"] == {"single": [0, 1]}
    runs = [json.loads((out / f"seed{s}" / "group_conflicts.json").read_text())["settings"]["single"] for s in (0, 1)]
    assert payload["settings"]["single"]["lewidi_ce"] == pytest.approx((runs[0]["lewidi_ce"] + runs[1]["lewidi_ce"]) / 2)
    import statistics

    assert payload["sd"]["single"]["lewidi_ce"] == pytest.approx(statistics.stdev([r["lewidi_ce"] for r in runs]))

    # --render trains nothing: the stored seed folders give the same summary, written into a results page section
    import subprocess
    import sys

    page = tmp_path / "results.md"
    page.write_text("# Results\n")
    (out / "seed1" / "group_conflicts.json").rename(out / "seed1" / "kept.json")  # one seed left: no sd, mean = it
    rendered = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "group_conflicts.py"), "--data", str(data), "--output_dir", str(out),
         "--render", "--docs", str(page)],
        capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    summary = json.loads((out / "group_conflicts.json").read_text())
    assert summary["seeds"] == {"single": [0]} and summary["sd"]["single"]["lewidi_ce"] is None
    assert summary["settings"]["single"]["lewidi_ce"] == pytest.approx(runs[0]["lewidi_ce"])
    text = page.read_text()
    assert "<!-- group-conflicts-two-sft-seeds:start -->" in text and f"{runs[0]['lewidi_ce']:.3f}" in text
