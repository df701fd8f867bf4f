"""``alpha="auto"``: α resolved by the stability criterion at the end of the warm-up, logged, in force afterwards,
recorded in ``renyi_ensemble.json`` and the card, restored on resume (not measured again), refused where it cannot
be honoured; ``--alpha auto`` on the command line. Two DDP processes resolve the same α (tests/test_distributed.py).
"""

import json
import math

import pytest

from tests.training_script import build_trainer
from trl_renyi.cli.parsing import parse_alpha
from trl_renyi.stability import recommend_alpha
from trl_renyi.training import auto_alpha as auto_alpha_module
from trl_renyi.training.config import RenyiDPOConfig, RenyiSFTConfig

AUTO = dict(alpha="auto", alpha_warmup_ratio=0.5, max_steps=6, num_members=2, auto_alpha_null_draws=10)


def alphas_logged(trainer):
    return [(e["step"], e["renyi/alpha"]) for e in trainer.state.log_history if "renyi/alpha" in e]


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_auto_alpha_is_resolved_at_the_end_of_the_warmup_and_recorded(tmp_path, tokenizer, kind):
    trainer = build_trainer(kind, tmp_path / "run", tokenizer=tokenizer, **AUTO)
    trainer.train()
    resolution = trainer.auto_alpha.resolution
    assert resolution is not None and resolution.step == 3 and resolution.num_units == 8
    # the recommendation of the measured figures (α = 1 when λ1 does not clear the null)
    expected = recommend_alpha(resolution.lambda1, resolution.lambda_null, trainer.args.responsibility_floor)
    assert resolution.alpha == pytest.approx(1.0 if expected is None else expected)
    assert resolution.significant == (resolution.lambda1 > resolution.lambda_null)
    # α = 1 during the warm-up, the resolution after it, in the log with λ1 and the null
    logged = alphas_logged(trainer)
    assert [a for s, a in logged if s <= 3] == [1.0] * 3
    assert [a for s, a in logged if s > 3] == [pytest.approx(resolution.alpha)] * 3
    after = [e for e in trainer.state.log_history if e.get("step", 0) > 3 and "renyi/alpha" in e]
    assert all(e["renyi/lambda1"] == pytest.approx(resolution.lambda1) for e in after)
    assert all(e["renyi/lambda_null"] == pytest.approx(resolution.lambda_null) for e in after)
    assert trainer.current_alpha() == pytest.approx(resolution.alpha)
    # renyi_ensemble.json and the card
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    metadata = json.loads((out / "renyi_ensemble.json").read_text())
    assert metadata["alpha"] == pytest.approx(resolution.alpha)
    assert metadata["alpha_auto"]["lambda1"] == pytest.approx(resolution.lambda1)
    assert metadata["alpha_auto"]["step"] == 3
    card = (out / "README.md").read_text()
    assert "alpha='auto'" in card and f"{resolution.lambda1:.4g}" in card


def test_a_resumed_run_keeps_the_resolved_alpha_without_measuring_again(tmp_path, tokenizer, monkeypatch):
    first = build_trainer("sft", tmp_path / "run", tokenizer=tokenizer, save_strategy="steps", save_steps=4, **AUTO)
    first.train()
    resolution = first.auto_alpha.resolution
    assert (tmp_path / "run" / "checkpoint-4" / auto_alpha_module.RESOLUTION_FILE).is_file()

    def no_second_measurement(trainer, step):
        raise AssertionError("the resumed run measured again")

    monkeypatch.setattr(auto_alpha_module, "measure", no_second_measurement)
    resumed = build_trainer("sft", tmp_path / "run", tokenizer=tokenizer, save_strategy="no", **AUTO)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    assert resumed.auto_alpha.resolution == resolution
    assert [a for s, a in alphas_logged(resumed) if s > 4] == [pytest.approx(resolution.alpha)] * 2


def test_a_resolved_alpha_below_one_trains_at_that_alpha(tmp_path, tokenizer, monkeypatch):
    """Whatever the criterion returns is the α the bound uses after the warm-up (a planted resolution)."""
    planted = auto_alpha_module.AlphaResolution(-0.5, 3, 9.0, 2.0, 0.8, True, 8, 0.0, "planted")
    monkeypatch.setattr(auto_alpha_module, "measure", lambda trainer, step: planted)
    trainer = build_trainer("sft", tmp_path / "run", tokenizer=tokenizer, **AUTO)
    trainer.train()
    assert [a for s, a in alphas_logged(trainer) if s > 3] == [-0.5] * 3
    assert trainer.ensemble.alpha == -0.5


def test_auto_alpha_is_refused_where_it_cannot_be_honoured(tmp_path):
    with pytest.raises(ValueError, match="alpha_warmup_ratio > 0"):
        RenyiSFTConfig(output_dir=str(tmp_path), alpha="auto", alpha_warmup_ratio=0.0, num_members=2)
    with pytest.raises(ValueError, match="packing=False"):
        RenyiSFTConfig(output_dir=str(tmp_path), alpha="auto", packing=True)
    with pytest.raises(ValueError, match="alpha must be a finite float or 'auto'"):
        RenyiSFTConfig(output_dir=str(tmp_path), alpha="automatic")
    with pytest.raises(ValueError, match="auto_alpha_units must be an integer >= 1"):
        RenyiSFTConfig(output_dir=str(tmp_path), alpha="auto", auto_alpha_units=0)
    from trl_renyi.training.dpo import check_likelihood_loss

    with pytest.raises(ValueError, match="f_divergence_type='forward_kl'"):
        check_likelihood_loss(RenyiDPOConfig(output_dir=str(tmp_path), alpha="auto", f_divergence_type="forward_kl"))


def test_the_command_line_takes_alpha_auto():
    assert parse_alpha("auto") == "auto" and parse_alpha("-1") == -1.0
    from trl_renyi.cli.sft import make_parser

    parsed = make_parser().parse_args_and_config(["--alpha", "auto", "--output_dir", "x", "--dataset_name", "y"])
    assert parsed[1].alpha == "auto"
    parsed = make_parser().parse_args_and_config(["--alpha", "0.25", "--output_dir", "x", "--dataset_name", "y"])
    assert parsed[1].alpha == 0.25 and not math.isnan(parsed[1].alpha)
