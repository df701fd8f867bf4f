"""The trainers' saving, loading and publishing (:mod:`trl_renyi.training.persistence`): the routing record of the
card, retraining into the same ``output_dir``, a model card only beside an ensemble, foreign files in ``output_dir``."""

import logging

import pytest
from peft import PeftModel

from tests.helpers import CPU_ARGS, lora_config
from trl_renyi import RenyiEnsemble, RenyiSFTConfig, RenyiSFTTrainer
from trl_renyi.training.persistence import routing_share_from_log_history, training_record


def test_routing_share_and_eval_figures_from_log_history():
    logs = [
        {"loss": 1.0, "renyi/alpha": 1.0, "renyi/member_0/share": 0.5, "renyi/member_1/share": 0.5},
        {"loss": 0.9, "renyi/alpha": 0.0, "renyi/member_0/share": 0.8, "renyi/member_1/share": 0.2},
        {"loss": 0.8, "renyi/alpha": 0.0, "renyi/member_0/share": 0.6, "renyi/member_1/share": 0.4},
        {"eval_loss": 0.7, "eval_runtime": 3.0, "epoch": 1.0},
        {"train_runtime": 10.0},
    ]
    share = routing_share_from_log_history(logs, 2, alpha=0.0)
    assert share == pytest.approx([0.7, 0.3])  # the warm-up entry at α = 1 is left out
    assert routing_share_from_log_history(logs, 2) == pytest.approx([(0.5 + 0.8 + 0.6) / 3, (0.5 + 0.2 + 0.4) / 3])
    assert routing_share_from_log_history([], 2) is None
    record = training_record(logs, 2, 0.0)
    assert record["eval_results"] == {"eval_loss": 0.7}
    assert training_record([], 2, 0.0) == {}


def make_trainer(output_dir, num_members, make_model, tokenizer, dataset, **overrides):
    args = RenyiSFTConfig(
        output_dir=str(output_dir),
        num_members=num_members,
        **{**CPU_ARGS, "member_init_std": 0.05, "max_steps": 2, "per_device_train_batch_size": 4, **overrides},
    )
    return RenyiSFTTrainer(
        model=make_model(), args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora_config()
    )


def test_retraining_into_the_same_output_dir_with_fewer_members(make_model, tokenizer, prompt_completion_dataset, tmp_path):
    """K = 4 then K = 2 into one --output_dir: no stale member_2/3, the first run's checkpoints kept, every member a
    plain PEFT adapter."""
    output_dir = tmp_path / "run"
    first = make_trainer(
        output_dir, 4, make_model, tokenizer, prompt_completion_dataset, save_strategy="steps", save_steps=1
    )
    first.train()
    first.save_model()
    assert sorted(p.name for p in output_dir.glob("member_*")) == [f"member_{k}" for k in range(4)]

    second = make_trainer(output_dir, 2, make_model, tokenizer, prompt_completion_dataset)
    second.train()
    second.save_model()
    assert sorted(p.name for p in output_dir.glob("member_*")) == ["member_0", "member_1"]
    assert {p.name for p in output_dir.glob("checkpoint-*")} == {"checkpoint-1", "checkpoint-2"}
    assert (output_dir / "training_args.bin").is_file() and (output_dir / "README.md").is_file()
    assert "| members K | 2 |" in (output_dir / "README.md").read_text()
    assert RenyiEnsemble.from_pretrained(output_dir, base_model=make_model(), tokenizer=tokenizer).num_members == 2
    assert RenyiEnsemble.from_pretrained(output_dir / "checkpoint-2", base_model=make_model()).num_members == 4
    PeftModel.from_pretrained(make_model(), str(output_dir / "member_1"))
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # nothing left beside it


def test_no_model_card_without_an_ensemble_beside_it(make_model, tokenizer, prompt_completion_dataset, tmp_path):
    """Training stopped before the final save (an interrupt): TRL's card hook ran at every checkpoint, but the
    output folder holds no card for an ensemble that was never saved."""
    output_dir = tmp_path / "run"
    trainer = make_trainer(
        output_dir, 2, make_model, tokenizer, prompt_completion_dataset, save_strategy="steps", save_steps=1
    )
    trainer.train()
    assert (output_dir / "checkpoint-2" / "README.md").is_file()  # every checkpoint is an ensemble with its card
    assert not (output_dir / "README.md").exists() and not (output_dir / "renyi_ensemble.json").exists()
    trainer.create_model_card(dataset_name="toy-data")
    assert not (output_dir / "README.md").exists()
    trainer.save_model()
    trainer.create_model_card(dataset_name="toy-data")
    assert "| training data | toy-data |" in (output_dir / "README.md").read_text()


def test_foreign_files_in_output_dir_are_named_before_training_and_refused_at_the_save(
    make_model, tokenizer, prompt_completion_dataset, tmp_path, caplog
):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "adapter_model.safetensors").write_text("another model")
    trainer = make_trainer(output_dir, 2, make_model, tokenizer, prompt_completion_dataset, max_steps=1)
    with caplog.at_level(logging.WARNING, logger="trl_renyi.training.persistence"):
        trainer.train()
    assert "save_model() into output_dir will be refused" in caplog.text and "adapter_model.safetensors" in caplog.text
    with pytest.raises(FileExistsError, match=r"run holds \['adapter_model\.safetensors'\], which trl_renyi did not write"):
        trainer.save_model()
    assert sorted(p.name for p in output_dir.iterdir()) == ["adapter_model.safetensors"]
    trainer.save_model(str(tmp_path / "elsewhere"))
    RenyiEnsemble.from_pretrained(tmp_path / "elsewhere", base_model=make_model())
