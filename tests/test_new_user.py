"""What a new user runs into, row by row: data in the wrong format or the wrong place is refused before any model
loads, in one line that names the file and the columns; misspelled flags get a suggestion; ShareGPT messages are
converted; every command reads the same dataset names."""

import json
import subprocess
from pathlib import Path

import pytest

from trl_renyi.cli import main as cli
from trl_renyi.data.formats import detect_format, prepare_training_dataset
from trl_renyi.data.loading import load_split

REPO = Path(__file__).resolve().parents[1]

NO_MODEL = "/nonexistent/model-that-would-fail-to-load"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_cli(capsys, *argv):
    code = cli(list(argv))
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    ("command", "rows", "expected"),
    [
        ("sft", [{"conversation": "hi"}], r"has columns \['conversation'\]; the SFT trainer expects prompt \+ completions"),
        ("sft", [{"prompt": "p", "chosen": "a", "rejected": "b"}], "These are preference data: train on them with `trl-renyi dpo`"),
        ("dpo", [{"prompt": "p", "completion": "c"}], "These are prompt-completion data: train on them with `trl-renyi sft`"),
    ],
    ids=["wrong-column", "dpo-data-to-sft", "sft-data-to-dpo"],
)
def test_data_in_the_wrong_format_is_one_line_before_the_model_loads(tmp_path, capsys, command, rows, expected):
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    code, lines = run_cli(
        capsys, command, "--dataset_name", str(data), "--model_name_or_path", NO_MODEL, "--output_dir", str(tmp_path / "o")
    )
    errors = [line for line in lines if line.startswith(f"trl-renyi {command}: error:")]
    assert code == 1 and len(errors) == 1, lines
    assert str(data) in errors[0]
    assert pytest.importorskip("re").search(expected, errors[0]), errors[0]
    assert "Traceback" not in "\n".join(lines)


def test_a_missing_data_file_is_named_and_never_sent_to_the_hub(tmp_path, capsys):
    code, lines = run_cli(capsys, "sft", "--dataset_name", str(tmp_path / "trian.jsonl"), "--output_dir", str(tmp_path))
    assert code == 1 and lines[-1].startswith(f"trl-renyi sft: error: {tmp_path / 'trian.jsonl'}: no such data file.")


def test_a_typo_in_a_folder_name_gets_a_suggestion(tmp_path, capsys):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "completion": "c"}])
    code, lines = run_cli(capsys, "sft", "--dataset_name", str(tmp_path / "trian.jsonl"), "--output_dir", str(tmp_path))
    assert code == 1 and f"Did you mean {str(tmp_path / 'train.jsonl')!r}?" in lines[-1]


def test_a_misspelled_flag_gets_did_you_mean(capsys):
    code, lines = run_cli(capsys, "sft", "--num_membres", "3")
    assert code == 1
    assert "unrecognized arguments: --num_membres (did you mean --num_members" in lines[-1]


def test_traceback_flag_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data file"):
        cli(["sft", "--traceback", "--dataset_name", str(tmp_path / "none.jsonl"), "--output_dir", str(tmp_path)])


def test_help_shows_the_defaults_the_command_uses(capsys):
    with pytest.raises(SystemExit):
        cli(["sft", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: smollm2-135m-instruct)" in text
    assert "--use_peft [USE_PEFT], --use-peft [USE_PEFT] Whether to use PEFT for training. (default: True)" in text


def test_sharegpt_messages_are_converted_like_trl_does():
    from datasets import Dataset

    dataset = Dataset.from_list(
        [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}]
    )
    converted, fmt = prepare_training_dataset(dataset, "sft", "chat.jsonl")
    assert fmt == "conversational"
    assert converted[0]["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def test_messages_without_roles_name_the_row_and_column():
    from datasets import Dataset

    dataset = Dataset.from_list([{"messages": [{"speaker": "user", "text": "Hi"}]}])
    with pytest.raises(ValueError, match=r"chat.jsonl, row 0 \(counting from 0\), column 'messages': a message has keys \['speaker', 'text'\]"):
        prepare_training_dataset(dataset, "sft", "chat.jsonl")


def test_every_command_reads_the_same_dataset_names(tmp_path):
    """The bundled datasets and gzipped JSON lines load through the one loader used by sft, dpo, eval and audit."""
    import gzip

    bundled = load_split("trl_renyi:conflict_sft_chat")
    assert detect_format(bundled.column_names, "sft") == "prompt-completion" and len(bundled) > 0
    path = tmp_path / "pairs.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    assert load_split(str(path))[0] == {"prompt": "p", "chosen": "a", "rejected": "b"}
    wrapped = tmp_path / "mc.json"
    wrapped.write_text(json.dumps({"data": [{"question": "q", "mc1_targets": {"choices": ["a"], "labels": [1]}}]}))
    assert load_split(str(wrapped))[0]["question"] == "q"
    with pytest.raises(ValueError, match="unknown bundled dataset.*Did you mean 'trl_renyi:conflict_sft'"):
        load_split("trl_renyi:conflict_stf")


def test_audit_reads_a_bundled_dataset_before_loading_the_model(tmp_path, capsys):
    code, lines = run_cli(
        capsys, "audit", "--ensemble", str(tmp_path / "missing-ensemble"), "--data", "trl_renyi:conflict_sft_chat"
    )
    assert code == 1 and "Hub" not in lines[-1] and "missing-ensemble" in lines[-1], lines


def test_bf16_defaults_off_without_an_accelerator(tmp_path):
    import torch

    from trl_renyi import RenyiSFTConfig

    if torch.accelerator.is_available():
        pytest.skip("this machine has an accelerator")
    assert RenyiSFTConfig(output_dir=str(tmp_path)).bf16 is False


# ------------------------------------------------------------------------------------------ inference as a chat user
@pytest.fixture
def chat_ensemble(make_model, tokenizer):
    from tests.helpers import lora_config
    from trl_renyi import RenyiEnsemble
    from trl_renyi.model.members import build_ensemble

    assert tokenizer.chat_template, "the test tokenizer must have a chat template"
    return RenyiEnsemble(build_ensemble(make_model(), lora_config(), 2, seed=0, init_std=0.3), tokenizer, alpha=0.0)


def test_a_plain_string_prompt_gets_the_chat_template(chat_ensemble):
    """generate / score / predict_choices of a plain string equal those of one user message (and one assistant
    message); ``use_chat_template=False`` renders the plain text instead."""
    user = [[{"role": "user", "content": "Greet Alice."}]]
    plain = chat_ensemble.generate(["Greet Alice."], max_new_tokens=4)[0]
    assert plain.token_ids == chat_ensemble.generate(user, max_new_tokens=4)[0].token_ids
    scored = chat_ensemble.score(["Greet Alice."], ["Hello Alice."]).member_loglik
    as_messages = chat_ensemble.score(user, [[{"role": "assistant", "content": "Hello Alice."}]]).member_loglik
    assert torch_equal(scored, as_messages)
    choices = chat_ensemble.predict_choices(["Greet Alice."], [["Hello Alice.", "Bye."]])[0].member_probs
    assert torch_equal(choices, chat_ensemble.predict_choices(user, [["Hello Alice.", "Bye."]])[0].member_probs)

    chat_ensemble.use_chat_template = False  # plain text: the template has to be applied by hand
    rendered = chat_ensemble.tokenizer.apply_chat_template(user[0], add_generation_prompt=True, tokenize=False)
    assert chat_ensemble.generate([rendered], max_new_tokens=4)[0].token_ids == plain.token_ids
    assert not torch_equal(chat_ensemble.score(["Greet Alice."], ["Hello Alice."]).member_loglik, scored)


def torch_equal(a, b) -> bool:
    import torch

    return torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def test_use_chat_template_without_a_template_is_refused(make_model, tokenizer):
    from tests.helpers import lora_config
    from trl_renyi import RenyiEnsemble
    from trl_renyi.model.members import build_ensemble

    import copy

    no_template = copy.deepcopy(tokenizer)
    no_template.chat_template = None
    model = build_ensemble(make_model(), lora_config(), 2, seed=0, init_std=0.3)
    assert RenyiEnsemble(model, no_template).wraps_plain_prompts is False
    with pytest.raises(ValueError, match="use_chat_template=True but the tokenizer has no chat template"):
        RenyiEnsemble(model, no_template, use_chat_template=True).score(["a"], ["b"])


# ------------------------------------------------------------------------------------------ quiet, truthful output
def test_a_run_prints_no_false_warning_and_reports_the_alpha_in_force(make_model, tokenizer, prompt_completion_dataset, tmp_path, caplog):
    """No "model_init_kwargs … ignored" (they were used), no deprecation warning from gradient checkpointing, no
    pin-memory warning without an accelerator, no "Could not find a config file" at the save; with logging_steps
    larger than the run the summary's renyi/alpha is the α in force at the end, not a mean over the steps."""
    import logging
    import warnings

    from peft import LoraConfig

    from trl_renyi import RenyiSFTConfig, RenyiSFTTrainer

    base_dir = tmp_path / "base"
    make_model().save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    args = RenyiSFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=4, logging_steps=50, per_device_train_batch_size=4, num_members=2,
        alpha=-1.0, alpha_warmup_ratio=0.5, report_to="none", save_strategy="no", model_init_kwargs={"dtype": "float32"},
        use_cpu=True,
    )
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        trainer = RenyiSFTTrainer(
            str(base_dir), args=args, train_dataset=prompt_completion_dataset, processing_class=tokenizer,
            peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        )
        trainer.train()
        trainer.save_model()
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    for phrase in ("model_init_kwargs", "gradient_checkpointing", "pin_memory", "Could not find a config file"):
        assert not [m for m in messages if phrase in m], (phrase, messages)
    summary = [e for e in trainer.state.log_history if "renyi/alpha" in e]
    assert summary and summary[-1]["renyi/alpha"] == -1.0
    # the seconds per optimizer step are in the log, so a slow (shared) machine shows itself
    assert 0 < summary[-1]["step_seconds"] < 60


def test_the_config_docstring_lists_the_ensemble_fields():
    from trl_renyi import RenyiDPOConfig, RenyiSFTConfig
    from trl_renyi.training.config import RenyiEnsembleArguments

    for config in (RenyiSFTConfig, RenyiDPOConfig):
        doc = config.__doc__
        assert "Parameters of the ensemble" in doc and "num_members (`int`, defaults to `4`)" in doc
        for name in RenyiEnsembleArguments.__dataclass_fields__:
            if name != "gradient_checkpointing":
                assert f"    {name} (" in doc, name
        assert doc.index("num_members (") < doc.index("Parameters of [`~trl.")  # then TRL's own parameters
    assert RenyiSFTConfig(output_dir="x").gradient_checkpointing is True  # TRL's default, without the warning


def test_eval_and_audit_say_what_they_read_and_explain_their_tables():
    from trl_renyi.evaluation.audit import audit_table
    from trl_renyi.evaluation.report import TABLE_LEGEND

    assert "AUROC(MI)" in TABLE_LEGEND and "acc@c" in TABLE_LEGEND
    row = {"index": 0, "mutual_information_max": 0.5, "mutual_information": 0.1, "loglik_std": 1.0,
           "routing_entropy": 0.6, "nll": 2.0, "top_member": 1, "prompt": "p", "completion": "c"}
    table = audit_table([row], "sft", "mutual_information_max", 5)
    assert "MI_max*" in table and "MI_max: largest per-token mutual information" in table
    assert "*: ranked by mutual_information_max" in table


def test_tensorboard_is_an_extra_that_make_install_can_include():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert any(req.startswith("tensorboard") for req in project["optional-dependencies"]["tensorboard"])
    dry_run = subprocess.run(
        ["make", "-n", "-B", "install", "EXTRAS=dev,tensorboard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert '-e ".[dev,tensorboard]"' in dry_run


def test_report_to_tensorboard_logs_the_renyi_metrics(make_model, tokenizer, prompt_completion_dataset, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (make install EXTRAS=dev,tensorboard)")
    from peft import LoraConfig
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trl_renyi import RenyiSFTConfig, RenyiSFTTrainer

    args = RenyiSFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=2, logging_steps=1, per_device_train_batch_size=4, num_members=2,
        report_to="tensorboard", save_strategy="no", use_cpu=True,
    )
    RenyiSFTTrainer(
        make_model(), args=args, train_dataset=prompt_completion_dataset, processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    ).train()
    (events,) = {p.parent for p in tmp_path.rglob("events.out.tfevents.*")}
    tags = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    assert {"train/renyi/alpha", "train/renyi/member_0/share", "train/renyi/member_1/share"} <= set(tags)


# ------------------------------------------------------------------------------------------ issue 26: named before work
CPU_FLAGS = ["--bf16", "false", "--use_cpu", "--report_to", "none", "--disable_tqdm", "true"]


def one_error_line(lines, command):
    errors = [line for line in lines if line.startswith(f"trl-renyi {command}: error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(lines), lines
    return errors[0]


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([{"prompt": "p", "completion": "c"}, {"prompt": "q", "completion": None}], r"row 1 \(counting from 0\), column 'completion': null"),
        ([{"prompt": "p", "completion": "c"}, {"prompt": 7, "completion": "c"}], r"row 1 \(counting from 0\), column 'prompt': int 7"),
        (
            [{"prompt": [{"role": "user", "content": None}], "completion": [{"role": "assistant", "content": "c"}]}],
            r"row 0 \(counting from 0\), column 'prompt': message 0 has content null",
        ),
    ],
    ids=["null-completion", "number-prompt", "null-message-content"],
)
def test_a_null_or_non_text_field_names_file_row_and_column_before_the_model_loads(tmp_path, capsys, rows, expected):
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    code, lines = run_cli(
        capsys, "sft", "--dataset_name", str(data), "--model_name_or_path", NO_MODEL, "--output_dir", str(tmp_path / "o")
    )
    error = one_error_line(lines, "sft")
    assert code == 1 and str(data) in error and "split 'train'" in error
    assert pytest.importorskip("re").search(expected, error), error


def test_an_empty_jsonl_file_is_one_line(tmp_path, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    code, lines = run_cli(capsys, "sft", "--dataset_name", str(data), "--model_name_or_path", NO_MODEL)
    assert code == 1 and one_error_line(lines, "sft").endswith(f"error: {data} is empty: it holds no rows. (add --traceback for details)")


def test_an_empty_dataset_is_refused_by_name_before_the_model_loads(tmp_path):
    from datasets import Dataset

    from trl_renyi import RenyiSFTConfig, RenyiSFTTrainer

    empty = Dataset.from_dict({"prompt": [], "completion": []})
    with pytest.raises(ValueError, match=r"^train_dataset is empty: it has columns \['completion', 'prompt'\] but no rows"):
        RenyiSFTTrainer(NO_MODEL, args=RenyiSFTConfig(output_dir=str(tmp_path), use_cpu=True), train_dataset=empty)


def test_a_tokenizer_larger_than_the_embeddings_is_refused_with_both_sizes(make_model, tokenizer, prompt_completion_dataset, tmp_path):
    import copy

    from tests.helpers import CPU_ARGS, lora_config
    from trl_renyi import RenyiSFTConfig, RenyiSFTTrainer

    larger = copy.deepcopy(tokenizer)
    larger.add_tokens([f"<extra_{i}>" for i in range(8)])
    model = make_model()
    rows = model.get_input_embeddings().weight.shape[0]
    args = RenyiSFTConfig(output_dir=str(tmp_path), num_members=2, max_steps=1, **CPU_ARGS)
    with pytest.raises(ValueError, match=rf"has {len(larger)} tokens but the model's embedding matrix has {rows} rows"):
        RenyiSFTTrainer(model, args=args, train_dataset=prompt_completion_dataset, processing_class=larger, peft_config=lora_config())


def read_only_path(tmp_path):
    """A folder nobody may write into (as root, permissions do not stop writes: a path in sysfs does)."""
    import os

    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder / "out"
    if not os.path.isdir("/sys/kernel"):
        pytest.skip("no read-only path to test with")
    return Path("/sys/kernel/trl-renyi-out")


def test_a_read_only_output_dir_is_one_line(tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "p", "completion": "c"}])
    out = read_only_path(tmp_path)
    code, lines = run_cli(capsys, "sft", "--dataset_name", str(data), "--model_name_or_path", NO_MODEL, "--output_dir", str(out))
    assert code == 1 and f"error: --output_dir {out}: cannot write there" in one_error_line(lines, "sft")


def test_resume_from_checkpoint_true_resumes_from_the_latest_checkpoint(tiny_model_dir, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    args = [
        "sft", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", "trl_renyi:conflict_sft", "--num_members",
        "2", "--lora_r", "4", "--per_device_train_batch_size", "4", "--max_length", "64", "--output_dir", str(out),
        "--save_strategy", "steps", "--save_steps", "2", *CPU_FLAGS,
    ]  # fmt: skip
    code, lines = run_cli(capsys, *args, "--max_steps", "2", "--resume_from_checkpoint", "True")
    assert code == 1 and "--resume_from_checkpoint True: no checkpoint-* folder" in one_error_line(lines, "sft")
    assert cli([*args, "--max_steps", "2"]) == 0 and (out / "checkpoint-2").is_dir()
    saved_state = out / "checkpoint-2" / "trainer_state.json"
    state = json.loads(saved_state.read_text())
    state["log_history"].append({"step": 2, "marker": "from checkpoint-2"})  # carried on only by a resumed run
    saved_state.write_text(json.dumps(state))
    caplog.set_level("INFO", logger="trl_renyi")
    assert cli([*args, "--max_steps", "4", "--resume_from_checkpoint", "True"]) == 0
    assert f"Resuming from {out / 'checkpoint-2'} (step 2)." in caplog.text  # the run says where it starts
    assert "Training 2 LoRA members (r = 4)" in caplog.text
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and {"step": 2, "marker": "from checkpoint-2"} in state["log_history"]


# ------------------------------------------------------------------------------------------ issue 26: quiet, truthful
def test_no_deprecation_warning_from_dpo_training_loading_eval_and_audit(tiny_model_dir, tmp_path, capsys):
    import warnings

    from trl_renyi import RenyiEnsemble

    out = tmp_path / "dpo"
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": " b", "rejected": " c"}] * 2)
    messages = write_jsonl(
        tmp_path / "messages.jsonl",
        [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]} for i in range(3)],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli([
            "dpo", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", "trl_renyi:conflict_preference",
            "--num_members", "2", "--lora_r", "4", "--max_steps", "1", "--per_device_train_batch_size", "4",
            "--max_length", "64", "--gradient_checkpointing", "true", "--save_strategy", "no", "--output_dir", str(out),
            *CPU_FLAGS,
        ]) == 0  # fmt: skip
        RenyiEnsemble.from_pretrained(str(out))
        common = ["--ensemble", str(out), "--plots", "false"]
        assert cli(["eval", *common, "--data", str(pairs), "--output_dir", str(tmp_path / "ev"), "--preference_scoring", "reward"]) == 0
        assert cli(["audit", *common, "--data", str(messages), "--output_dir", str(tmp_path / "au")]) == 0
    deprecations = [
        f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})"
        for w in caught
        if issubclass(w.category, (FutureWarning, DeprecationWarning)) and "deprecated" in str(w.message)
        and "torch/jit" not in w.filename  # torch's own import-time notice
    ]
    assert not deprecations, deprecations
    printed = capsys.readouterr().out
    # eval says on screen why the base baseline is left out; audit names the format it detected
    assert "base: left out under reward scoring (the base model is the reference" in printed
    assert f"{messages}: 3 sft examples (chat messages)." in printed


def test_eval_strategy_without_a_test_split_shows_the_value_as_written(tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "p", "completion": "c"}])
    code, lines = run_cli(
        capsys, "sft", "--dataset_name", str(data), "--model_name_or_path", NO_MODEL, "--eval_strategy", "steps",
        "--output_dir", str(tmp_path / "o"),
    )  # fmt: skip
    error = one_error_line(lines, "sft")
    assert code == 1 and "eval_strategy='steps' needs the split dataset_test_split='test'" in error
    assert "IntervalStrategy" not in error


def test_the_example_scripts_are_the_commands_complete_scripts():
    """examples/sft_renyi.py and dpo_renyi.py are the very files `trl-renyi sft` / `dpo` run: the whole script, with
    make_parser() and main() as in TRL's trl/scripts/sft.py, and the trainer built in the file itself."""
    import os

    from trl_renyi.cli import dpo, sft

    for example, module, trainer in (("sft_renyi.py", sft, "RenyiSFTTrainer("), ("dpo_renyi.py", dpo, "RenyiDPOTrainer(")):
        path = REPO / "examples" / example
        assert os.path.samefile(path, module.__file__)
        text = path.read_text()
        assert trainer in text and "trainer.train(" in text and "save_and_push(trainer" in text
        assert callable(module.make_parser) and callable(module.main)
    assert "importlib" not in (REPO / "trl_renyi" / "cli" / "training.py").read_text()


# ------------------------------------------------------------------- issue 35: bad model ids, YAML typos, group files
@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("someone/no-such-model", "model 'someone/no-such-model' is no local folder and not in the Hugging Face cache"),
        ("./models/no-such-folder", "model './models/no-such-folder': no such local folder (looked in"),
        ("smollm2-135m-instrct", "Did you mean the embedded 'smollm2-135m-instruct'?"),
    ],
)
def test_a_bad_model_id_is_one_line_naming_it(tmp_path, capsys, monkeypatch, model, expected):
    """Offline (as the tests run): a Hub-style id that is not cached, a missing local path and a typo of an embedded
    alias each give one line naming the id, where it was looked for and the embedded models, before anything loads."""
    monkeypatch.chdir(tmp_path)
    args = ["sft", "--model_name_or_path", model, "--dataset_name", "trl_renyi:conflict_sft", "--output_dir", "out"]
    code, lines = run_cli(capsys, *args)
    line = one_error_line(lines, "sft")
    assert code == 1 and expected in line and "Embedded models (offline): smollm2-135m-instruct" in line


def test_a_model_the_hub_cannot_give_is_one_line_too(monkeypatch, make_model, tokenizer, prompt_completion_dataset, tmp_path):
    """Online, whether a Hub id exists is the download's to say: its OSError becomes one line naming the id, for the
    trainers (TRL's loader) and for loading a base model (scoring, eval)."""
    from huggingface_hub import constants

    from trl_renyi import RenyiSFTConfig, RenyiSFTTrainer
    from trl_renyi.model import loading
    from trl_renyi.training import construction

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def not_found(*args, **kwargs):
        raise OSError("someone/private is not a local folder and is not a valid model identifier listed on the Hub\nmore")

    monkeypatch.setattr(construction, "create_model_from_path", not_found)
    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", not_found)
    args = RenyiSFTConfig(output_dir=str(tmp_path), num_members=2, report_to="none", use_cpu=True)
    with pytest.raises(FileNotFoundError, match=r"^model 'someone/private' could not be loaded: someone/private is not "):
        RenyiSFTTrainer("someone/private", args=args, train_dataset=prompt_completion_dataset,
                        processing_class=tokenizer, peft_config=__import__("peft").LoraConfig(r=4))  # fmt: skip
    with pytest.raises(FileNotFoundError, match=r"^model 'someone/private' could not be loaded"):
        loading.load_causal_lm("someone/private")


def test_a_typo_in_a_yaml_config_gets_did_you_mean(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("num_member: 2\nalpah: 0\nmax_steps: 1\n")
    code, lines = run_cli(capsys, "sft", "--config", str(config), "--output_dir", str(tmp_path / "out"))
    line = one_error_line(lines, "sft")
    assert code == 1 and f"unknown keys in {config}: num_member (did you mean num_members?)" in line
    assert "alpah (did you mean alpha" in line
