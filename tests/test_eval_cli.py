"""`trl-renyi eval` and `trl-renyi audit` end to end on a tiny saved ensemble and small generated data files."""

import json

import pytest
import torch
from peft import get_peft_model

from tests.helpers import lora_config
from trl_renyi import RenyiEnsemble
from trl_renyi.cli import main as cli_main
from trl_renyi.cli.eval import parse_baseline
from trl_renyi.evaluation.data import load_choice_items, model_inputs, split_dialogue, training_examples
from trl_renyi.evaluation.metrics import summarize
from trl_renyi.inference.baseline import SingleModel
from trl_renyi.model.members import build_ensemble
from trl_renyi.testing import tiny_llama

QUESTIONS = [
    ("What colour is the sky?", ["It is blue.", "It is green.", "It is red."], 0),
    ("What is two plus three?", ["Four.", "Five."], 1),
    ("What is the capital of France?", ["Berlin.", "Rome.", "Madrid.", "Paris."], 3),
    ("Say hello.", ["Ahoy matey!", "Good morning, sir."], 0),
    ("Count to three.", ["one two three", "un deux trois", "three two one"], 0),
    ("Name a colour.", ["red", "seven"], 0),
]
PAIRS = [
    {"prompt": "What colour is grass?", "chosen": " green", "rejected": " purple"},
    {"prompt": "Say good morning.", "chosen": " Good morning, sir.", "rejected": " Ahoy!"},
    {"chosen": "\n\nHuman: Say hello.\n\nAssistant: Hello there!", "rejected": "\n\nHuman: Say hello.\n\nAssistant: No."},
    {"prompt": "What is two plus three?", "chosen": " Five.", "rejected": " Four."},
]
TRAIN = [
    {"prompt": "What colour is the sky?", "completion": " It is blue."},
    {"prompt": "What colour is the sky?", "completion": " It is green."},
    {"prompt": "Say hello.", "completion": " Ahoy matey!"},
    {"prompt": "Say hello.", "completion": " Good morning, sir."},
    {"prompt": "What is two plus three?", "completion": " Five."},
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("eval")
    base_dir = root / "base"
    tiny_llama(tokenizer, seed=0, init_std=0.5).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    base = type(tiny_llama(tokenizer)).from_pretrained(base_dir)
    ensemble = RenyiEnsemble(build_ensemble(base, lora_config(), 3, seed=0, init_std=0.3), tokenizer, alpha=0.0)
    ensemble.save_pretrained(root / "ensemble")
    single = get_peft_model(type(base).from_pretrained(base_dir), lora_config())
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in single.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    single.save_pretrained(root / "single")
    mc = [
        {"question": q, "mc1_targets": {"choices": c, "labels": [int(i == y) for i in range(len(c))]}, "category": "t"}
        for q, c, y in QUESTIONS
    ]
    (root / "mc.json").write_text(json.dumps(mc))
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in PAIRS) + "\n")
    (root / "train.jsonl").write_text("\n".join(json.dumps(p) for p in TRAIN) + "\n")
    (root / "prefs.jsonl").write_text("\n".join(json.dumps(p) for p in PAIRS if "prompt" in p) + "\n")
    return root


def test_eval_multiple_choice_report_matches_the_api(saved, tmp_path):
    out = tmp_path / "report"
    code = cli_main(
        ["eval", "--ensemble", str(saved / "ensemble"), "--data", str(saved / "mc.json"), "--output_dir", str(out),
         "--baselines", "base", "member:1", f"single=adapter:{saved / 'single'}", "--n_bins", "5",
         "--coverages", "0.5", "1.0", "--chat", "no"]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"ensemble", "base", "member_1", "single"}
    assert report["data"] == {"path": str(saved / "mc.json"), "format": "mc1", "num_items": 6, "first_item": 0}
    for name in ("reliability", "uncertainty_hist", "routing_heatmap", "selective_accuracy"):
        assert (out / f"{name}.png").stat().st_size > 1000

    # the report's figures equal the metrics of predictions recomputed through the Python API
    ensemble = RenyiEnsemble.from_pretrained(saved / "ensemble", use_chat_template=False)  # as --chat no
    items, fmt = load_choice_items(saved / "mc.json")
    prompts, choices = model_inputs(items, fmt, ensemble.tokenizer, chat=False)
    assert prompts[0] == "Q: What colour is the sky?\nA:" and choices[0][0] == " It is blue."
    labels = [item.labels for item in items]
    predictions = ensemble.predict_choices(prompts, choices)
    expected = summarize(
        [p.probs for p in predictions], labels,
        {"entropy": [p.entropy for p in predictions], "mutual_information": [p.mutual_information for p in predictions]},
        n_bins=5, coverages=[0.5, 1.0],
    )
    got = report["models"]["ensemble"]
    for key in ("accuracy", "nll", "ece", "brier"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    assert got["selective_accuracy"]["entropy"]["1"] == pytest.approx(expected["accuracy"])
    member = summarize([p.member_probs[1] for p in predictions], labels, n_bins=5, coverages=[0.5, 1.0])
    assert report["models"]["member_1"]["accuracy"] == pytest.approx(member["accuracy"])
    assert report["models"]["member_1"]["nll"] == pytest.approx(member["nll"], rel=1e-5)
    assert got["members"]["member_1"]["nll"] == pytest.approx(member["nll"], rel=1e-5)
    assert sum(got["routing"]["mean_responsibility"].values()) == pytest.approx(1.0)
    # baselines: the base model with adapters off, and the plain PEFT adapter folder
    base = SingleModel.from_pretrained(saved / "base", use_chat_template=False)
    base_nll = summarize([p.probs for p in base.predict_choices(prompts, choices)], labels)["nll"]
    assert report["models"]["base"]["nll"] == pytest.approx(base_nll, rel=1e-5)
    assert report["models"]["single"]["nll"] != pytest.approx(base_nll, rel=1e-3)
    assert report["models"]["base"]["mean_mutual_information"] == 0.0
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 6 and set(json.loads(lines[0])) >= {"id", "labels", "ensemble", "base", "single"}


def test_eval_preference_pairs_by_likelihood_and_reward(saved, tmp_path, capsys):
    out = tmp_path / "pref"
    args = ["eval", "--ensemble", str(saved / "ensemble"), "--data", str(saved / "pairs.jsonl"), "--output_dir"]
    capsys.readouterr()
    assert cli_main([*args, str(out), "--baselines", "base", "--no_plots"]) == 0
    assert f"Report and predictions (no plots: --no_plots) written to {out}." in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["format"] == "preference" and report["data"]["num_items"] == 4
    assert set(report["models"]) == {"ensemble", "base"}
    assert not (out / "reliability.png").exists()
    assert cli_main([*args, str(tmp_path / "reward"), "--preference_scoring", "reward", "--beta", "0.5"]) == 0
    reward = json.loads((tmp_path / "reward" / "report.json").read_text())
    assert set(reward["models"]) == {"ensemble"} and reward["notes"]
    # reward probabilities: σ(β·margin) of each member against the base model
    ensemble = RenyiEnsemble.from_pretrained(saved / "ensemble")
    base = SingleModel.base_of(ensemble)
    prompt, chosen, rejected = split_dialogue(PAIRS[2]["chosen"], PAIRS[2]["rejected"])
    assert prompt == "\n\nHuman: Say hello.\n\nAssistant:" and chosen == " Hello there!" and rejected == " No."
    policy = ensemble.score([prompt, prompt], [chosen, rejected]).member_loglik
    ref = base.score([prompt, prompt], [chosen, rejected]).member_loglik
    margin = 0.5 * ((policy[0] - ref[0]) - (policy[1] - ref[1]))
    row = json.loads((tmp_path / "reward" / "predictions.jsonl").read_text().splitlines()[2])
    torch.testing.assert_close(torch.tensor(row["ensemble"]["member_probs"])[:, 0], torch.sigmoid(margin), rtol=1e-4, atol=1e-6)


def test_audit_ranks_training_examples_by_disagreement(saved, tmp_path):
    out = tmp_path / "audit"
    code = cli_main(["audit", "--ensemble", str(saved / "ensemble"), "--data", str(saved / "train.jsonl"),
                     "--output_dir", str(out), "--top", "3", "--sort_by", "loglik_std"])
    assert code == 0
    rows = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    stds = [r["loglik_std"] for r in rows]
    assert stds == sorted(stds, reverse=True)
    # independent: the members' log-likelihood spread from the ensemble's scores
    ensemble = RenyiEnsemble.from_pretrained(saved / "ensemble")
    scores = ensemble.score([t["prompt"] for t in TRAIN], [t["completion"] for t in TRAIN])
    expected = scores.member_loglik.double().std(-1, unbiased=False)
    assert [r["index"] for r in rows] == torch.argsort(expected, descending=True).tolist()
    assert rows[0]["prompt"] == TRAIN[rows[0]["index"]]["prompt"]
    assert (out / "audit_scores.png").is_file() and (out / "audit_routing.png").is_file()


def test_audit_of_preference_pairs_uses_the_implicit_reward(saved, tmp_path):
    out = tmp_path / "audit_pref"
    code = cli_main(["audit", "--ensemble", str(saved / "ensemble"), "--data", str(saved / "prefs.jsonl"),
                     "--output_dir", str(out), "--beta", "0.2", "--plots", "false"])
    assert code == 0
    rows = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    mis = [r["mutual_information"] for r in rows]
    assert mis == sorted(mis, reverse=True) and len(rows) == 3
    ensemble = RenyiEnsemble.from_pretrained(saved / "ensemble")
    base = SingleModel.base_of(ensemble)
    pair = [p for p in PAIRS if "prompt" in p][rows[0]["index"]]  # prefs.jsonl holds the pairs with a prompt
    prompts, completions = [pair["prompt"]] * 2, [pair["chosen"], pair["rejected"]]
    policy, ref = ensemble.score(prompts, completions).member_loglik, base.score(prompts, completions).member_loglik
    margin = 0.2 * ((policy[0] - ref[0]) - (policy[1] - ref[1]))
    torch.testing.assert_close(torch.tensor(rows[0]["member_prob_chosen"]), torch.sigmoid(margin), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        torch.tensor(rows[0]["member_loglik"]), torch.nn.functional.logsigmoid(margin), rtol=1e-4, atol=1e-5
    )


def test_training_data_formats():
    from datasets import Dataset

    messages = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy"}]]
    kind, columns = training_examples(Dataset.from_dict({"messages": messages}))
    assert kind == "sft" and columns["prompt"] == [messages[0][:1]] and columns["completion"] == [messages[0][1:]]
    kind, columns = training_examples(Dataset.from_dict({"text": ["Hello there."]}))
    assert kind == "sft" and columns == {"prompt": [""], "completion": ["Hello there."]}
    kind, columns = training_examples(Dataset.from_dict({"chosen": [PAIRS[2]["chosen"]], "rejected": [PAIRS[2]["rejected"]]}))
    assert kind == "preference" and columns["prompt"] == ["\n\nHuman: Say hello.\n\nAssistant:"]
    with pytest.raises(ValueError, match="expected prompt/completion"):
        training_examples(Dataset.from_dict({"question": ["?"]}), "data.jsonl")


def test_mc2_items(tmp_path):
    path = tmp_path / "mc2.json"
    path.write_text(json.dumps([{"question": "Q?", "mc2_targets": {"choices": ["a", "b", "c"], "labels": [1, 1, 0]}}] * 3))
    items, fmt = load_choice_items(path, first_item=1)
    assert fmt == "mc2" and len(items) == 2 and items[0].labels == [1, 1, 0] and items[0].id == "1"


def test_bad_inputs_name_the_problem(saved, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "Q?", "mc1_targets": {"choices": ["a", "b"], "labels": [1, 1]}}]))
    with pytest.raises(ValueError, match="exactly one correct"):
        load_choice_items(bad)
    bad.write_text(json.dumps([{"question": "Q?", "answers": ["a"]}]))
    with pytest.raises(ValueError, match="Cannot tell the format"):
        load_choice_items(bad)
    with pytest.raises(ValueError, match="unknown kind"):
        parse_baseline("lora:x")
    assert parse_baseline("mine=adapter:/a/b") == ("mine", "adapter", "/a/b")
    assert parse_baseline("member:2") == ("member_2", "member", "2")
