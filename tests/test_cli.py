"""`trl-renyi sft` / `dpo`: TRL's flags and YAML configs, local data files, the saved ensemble; the examples."""

import importlib.util
import json
import runpy
import sys
from pathlib import Path

import pytest
import yaml
from datasets import Dataset, DatasetDict

from trl_renyi import RenyiDPOConfig, RenyiEnsemble, RenyiSFTConfig
from trl_renyi.cli import main as cli_main
from trl_renyi.cli.training import ensemble_peft_config, load_training_data, make_parser, select_splits

REPO = Path(__file__).resolve().parents[1]
CPU_FLAGS = ["--bf16", "false", "--use_cpu", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true"]


def sft_rows():
    return {
        "prompt": ["Greet Alice.", "Greet Bob.", "What is 2 + 3?", "What is 4 + 4?"] * 2,
        "completion": [" Good day, Alice.", " Ahoy, Bob!", " 5.", " 8."] * 2,
    }


def test_sft_command_with_yaml_config_and_local_jsonl(tiny_model_dir, tmp_path):
    data_file = tmp_path / "train.jsonl"
    Dataset.from_dict(sft_rows()).to_json(str(data_file))
    config = tmp_path / "sft.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(tiny_model_dir),
                "dataset_name": str(data_file),
                "num_members": 2,
                "alpha": 0.5,
                "member_init_std": 0.02,
                "lora_r": 4,
                "lora_alpha": 8,
                "lora_target_modules": "all-linear",
                "max_steps": 2,
                "per_device_train_batch_size": 4,
                "learning_rate": 1e-2,
            }
        )
    )
    out = tmp_path / "out"
    # the command line overrides the YAML file (alpha), as with `trl sft`
    assert cli_main(["sft", "--config", str(config), "--alpha", "-1", "--output_dir", str(out), *CPU_FLAGS]) == 0

    meta = json.loads((out / "renyi_ensemble.json").read_text())
    assert meta["num_members"] == 2 and meta["alpha"] == -1.0 and meta["member_init_std"] == 0.02
    assert meta["base_model_name_or_path"] == str(tiny_model_dir) and len(meta["routing_share"]) == 2
    for name in ("member_0", "member_1"):
        adapter = json.loads((out / name / "adapter_config.json").read_text())
        assert adapter["r"] == 4 and adapter["lora_alpha"] == 8
        adapted = {module.rsplit(".", 1)[-1] for module in adapter["target_modules"]}
        assert {"q_proj", "v_proj", "gate_proj", "down_proj"} <= adapted  # all linear layers
    assert "| members K | 2 |" in (out / "README.md").read_text()

    ensemble = RenyiEnsemble.from_pretrained(str(out))  # base model and tokenizer from the recorded path
    scores = ensemble.score(["Greet Alice."], [" Good day, Alice."])
    assert scores.member_loglik.shape == (1, 2) and bool(scores.member_loglik.isfinite().all())


def test_parser_takes_trl_flags_and_ensemble_fields(tmp_path):
    parser = make_parser(RenyiSFTConfig, "trl-renyi sft")
    script_args, training_args, model_args, _ = parser.parse_args_and_config(
        [
            "--model_name_or_path", "smollm2-135m-instruct", "--dataset_name", "trl-lib/Capybara", "--packing",
            "--eos_token", "<|im_end|>", "--use_peft", "--lora_r", "32", "--lora_target_modules", "all-linear",
            "--num_members", "3", "--alpha", "-1", "--alpha_warmup_ratio", "0.5", "--output_dir", str(tmp_path), *CPU_FLAGS,
        ]
    )  # fmt: skip
    assert script_args.dataset_name == "trl-lib/Capybara" and training_args.packing
    assert (training_args.num_members, training_args.alpha, training_args.alpha_warmup_ratio) == (3, -1.0, 0.5)
    peft_config = ensemble_peft_config(model_args)
    assert peft_config.r == 32 and peft_config.target_modules == "all-linear"  # PEFT's shorthand, not a module name

    model_args.use_peft = False  # LoRA members are implied
    model_args.lora_target_modules = ["q_proj", "v_proj"]
    assert ensemble_peft_config(model_args).target_modules == {"q_proj", "v_proj"}

    with pytest.raises(ValueError, match="num_members"):
        parser.parse_args_and_config(["--num_members", "0", "--output_dir", str(tmp_path), *CPU_FLAGS])
    with pytest.raises(ValueError, match="not_a_flag"):
        parser.parse_args_and_config(["--not_a_flag", "1", "--output_dir", str(tmp_path), *CPU_FLAGS])


def test_local_data_files_and_bundled_data(tmp_path):
    rows = sft_rows()
    reference = Dataset.from_dict(rows)
    reference.to_json(str(tmp_path / "d.json"))
    reference.to_csv(str(tmp_path / "d.csv"), index=False)
    reference.to_parquet(str(tmp_path / "d.parquet"))
    DatasetDict({"train": reference, "test": reference.select(range(2))}).save_to_disk(str(tmp_path / "saved"))
    parser = make_parser(RenyiSFTConfig, "trl-renyi sft")

    def load(name, *extra):
        script_args, training_args, _, dataset_args = parser.parse_args_and_config(
            ["--dataset_name", name, "--output_dir", str(tmp_path), *CPU_FLAGS, *extra]
        )
        return select_splits(load_training_data(script_args, dataset_args), script_args, training_args)

    for name in ("d.json", "d.csv", "d.parquet", "saved"):
        train, _ = load(str(tmp_path / name))
        assert train["prompt"] == rows["prompt"] and train["completion"] == rows["completion"], name
    train, test = load(str(tmp_path / "saved"), "--eval_strategy", "steps")
    assert len(test) == 2

    train, _ = load("trl_renyi:conflict_sft")
    assert {"prompt", "completion", "family"} <= set(train.column_names) and len(train) > 100

    with pytest.raises(ValueError, match="dataset_test_split"):
        load(str(tmp_path / "d.csv"), "--eval_strategy", "steps")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported file type"):
        load(str(tmp_path / "d.txt"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="unknown bundled dataset"):
        load("trl_renyi:poems")


@pytest.mark.skipif(importlib.util.find_spec("trl_renyi.training.dpo") is None, reason="trl_renyi.training.dpo (RenyiDPOTrainer) is absent")
def test_dpo_command_on_bundled_preference_data(tiny_model_dir, tmp_path):
    out = tmp_path / "dpo"
    args = [
        "dpo", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", "trl_renyi:conflict_preference",
        "--num_members", "2", "--alpha", "0", "--member_init_std", "0.02", "--lora_r", "4",
        "--lora_target_modules", "all-linear", "--max_steps", "1", "--per_device_train_batch_size", "4",
        "--max_length", "64", "--output_dir", str(out), *CPU_FLAGS,
    ]  # fmt: skip
    assert cli_main(args) == 0
    meta = json.loads((out / "renyi_ensemble.json").read_text())
    assert meta["trainer"] == "RenyiDPOTrainer" and meta["num_members"] == 2
    assert (out / "member_1" / "adapter_model.safetensors").is_file()
    assert "dpo" in yaml.safe_load((out / "README.md").read_text().split("---\n")[1])["tags"]


@pytest.mark.parametrize(
    "script, dataset", [("sft_renyi.py", "trl_renyi:conflict_sft"), ("dpo_renyi.py", "trl_renyi:conflict_preference")]
)
def test_example_scripts_run(tiny_model_dir, tmp_path, monkeypatch, script, dataset):
    if script.startswith("dpo") and importlib.util.find_spec("trl_renyi.training.dpo") is None:
        pytest.skip("trl_renyi.training.dpo (RenyiDPOTrainer) is absent")
    out = tmp_path / "example"
    argv = [
        script, "--model_name_or_path", str(tiny_model_dir), "--dataset_name", dataset,
        "--num_members", "2", "--lora_r", "4", "--max_steps", "1", "--per_device_train_batch_size", "4",
        "--max_length", "64", "--output_dir", str(out), *CPU_FLAGS,
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(REPO / "examples" / script), run_name="__main__")
    meta = json.loads((out / "renyi_ensemble.json").read_text())
    assert meta["num_members"] == 2 and meta["trainer"] == ("RenyiDPOTrainer" if script.startswith("dpo") else "RenyiSFTTrainer")


@pytest.mark.parametrize("path", sorted((REPO / "examples" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_parse_without_unknown_keys(path, tmp_path):
    from trl import TrlParser

    from trl_renyi.cli.demo import DemoConfig

    args = ["--config", str(path), "--output_dir", str(tmp_path)]
    if path.name.startswith("demo"):
        parser = TrlParser((DemoConfig,))
    else:
        parser = make_parser(RenyiDPOConfig if path.name.startswith("dpo") else RenyiSFTConfig, "test")
        args += ["--bf16", "false", "--use_cpu"]
    # fail_with_unknown_args: a key no dataclass knows is an error
    parsed = parser.parse_args_and_config(args)
    assert parsed[0] is not None
