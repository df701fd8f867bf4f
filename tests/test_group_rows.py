"""A group-annotated file trained straight from the command line (``--group_rows``), group names dropped."""

import json
import logging

import pytest

from trl_renyi.cli import main as cli_main
from trl_renyi.data.group_conflicts import GROUP_ROWS_BY_TRAINER, group_training_dataset
from trl_renyi.training import construction

CPU_FLAGS = ["--bf16", "false", "--use_cpu", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true"]
GROUPS = ("Zeboim", "Quxtown")  # names no prompt or answer contains


def group_file(path, items=8, held_out=2):
    """Items answered by two groups of two annotators each; the last ``held_out`` are the file's own test split."""
    rows = []
    for i in range(items):
        votes = {"a1": 0, "a2": 0, "b1": 1, "b2": 1} if i % 2 else {"a1": 0, "a2": 0, "b1": 0, "b2": 0}
        group_of = {"a1": GROUPS[0], "a2": GROUPS[0], "b1": GROUPS[1], "b2": GROUPS[1]}
        counts = {g: [sum(1 for a, o in votes.items() if group_of[a] == g and o == c) for c in (0, 1)] for g in GROUPS}
        rows.append({
            "id": f"item-{i}", "prompt": f"Is statement {i} rude? Answer Yes or No.", "options": ["No", "Yes"],
            "groups": counts, "split": "test" if i >= items - held_out else "train",
            "annotations": [{"annotator": a, "group": group_of[a], "option": o} for a, o in votes.items()],
        })  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def built_rows(monkeypatch):
    """The training rows every trainer built from a group file, as the trainer received them."""
    seen = []
    original = construction.prepare_group_rows

    def recording(args, train, evaluation, kind):
        out = original(args, train, evaluation, kind)
        seen.append((kind, out[0]))
        return out

    monkeypatch.setattr(construction, "prepare_group_rows", recording)
    return seen


def run(kind, tiny_model_dir, data, out, *extra):
    args = [
        kind, "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--num_members", "2",
        "--alpha", "0", "--lora_r", "4", "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--output_dir", str(out), *CPU_FLAGS, *extra,
    ]  # fmt: skip
    return cli_main(args)


@pytest.mark.parametrize(
    ("kind", "rows", "columns"),
    [
        ("sft", "vote", {"prompt", "completion"}),
        ("sft", "annotator", {"prompt", "completions", "completion_weights", "annotator"}),
        ("dpo", None, {"prompt", "chosen", "rejected"}),
    ],
)
def test_a_group_file_trains_from_the_command_line(kind, rows, columns, tiny_model_dir, tmp_path, built_rows, caplog):
    data = group_file(tmp_path / "groups.jsonl")
    caplog.set_level(logging.INFO, logger="trl_renyi")
    extra = ["--group_rows", rows] if rows else []
    assert run(kind, tiny_model_dir, data, tmp_path / "out", *extra) == 0
    (built_kind, dataset), = built_rows
    assert built_kind == kind and set(dataset.column_names) == columns
    train_items = 6  # the file's two test items never reach training
    expected_rows = {"vote": train_items * 4, "annotator": train_items, None: train_items * 2}[rows]
    assert len(dataset) == expected_rows
    text = json.dumps(dataset.to_list())
    assert not any(group in text for group in GROUPS), "a group name reached the training rows"
    assert "statement 7" not in text and "statement 6" not in text
    log = caplog.text
    assert f"6 items became {expected_rows} '{rows or 'pairs'}' training rows" in log and "6 of its 8 items are of the file's split 'train'" in log
    assert json.loads((tmp_path / "out" / "renyi_ensemble.json").read_text())["num_members"] == 2
    if rows == "annotator":  # routed by annotator: the setting is made and said, and the run says how
        assert "source_column set to 'annotator'" in log
        assert "Routing by source: column 'annotator', 4 sources in the training data" in log


def test_group_rows_for_the_other_trainer_or_other_data_are_refused(tiny_model_dir, tmp_path):
    data = group_file(tmp_path / "groups.jsonl")
    with pytest.raises(ValueError, match=r"group_rows='pairs' builds DPO rows .* the SFT trainer takes group_rows in"):
        group_training_dataset(__import__("datasets").load_dataset("json", data_files=str(data))["train"], "pairs", "sft")
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "Hi", "completion": " Hello."}) + "\n")
    assert run("sft", tiny_model_dir, plain, tmp_path / "o", "--group_rows", "vote") == 1  # one line, no traceback


def test_group_rows_need_their_settings_and_refuse_a_conflicting_one(tiny_model_dir, tmp_path):
    data = group_file(tmp_path / "groups.jsonl")
    assert run("sft", tiny_model_dir, data, tmp_path / "o", "--group_rows", "annotator", "--source_column", "rater") == 1


def test_every_trainer_has_a_default_kind_of_rows():
    assert GROUP_ROWS_BY_TRAINER["sft"][0] == "vote" and GROUP_ROWS_BY_TRAINER["dpo"] == ("pairs",)
