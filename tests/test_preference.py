"""A DPO ensemble is scored as it was trained: its preference likelihood (β, loss type, label smoothing, f-divergence)
is recorded in renyi_ensemble.json and scoring the training pairs after a save and reload reproduces the trainer's own
ℓ_ik; what scoring cannot reproduce (LD-DPO's token weighting, a separate reference model) is refused by name."""

import json

import pytest
import torch
from datasets import Dataset

from tests.helpers import CPU_ARGS, lora_config
from tests.training_script import CHOSEN, PROMPTS, REJECTED
from trl_renyi import RenyiDPOConfig, RenyiDPOTrainer, RenyiEnsemble
from trl_renyi.inference.baseline import SingleModel
from trl_renyi.preference import PreferenceLikelihood

VARIANTS = {
    "sigmoid": dict(loss_type=["sigmoid"]),
    "sigmoid, smoothed": dict(loss_type=["sigmoid"], label_smoothing=0.1),
    "robust": dict(loss_type=["robust"], label_smoothing=0.2),
    "forward KL": dict(f_divergence_type="forward_kl"),
    "JS": dict(f_divergence_type="js_divergence"),
    "α-divergence": dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5),
}


def train_and_save(tmp_path, tiny_model_dir, tokenizer, **settings):
    dataset = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    args = RenyiDPOConfig(
        output_dir=str(tmp_path / "run"), num_members=2, alpha=0.0, alpha_warmup_ratio=0.0, member_init_std=0.05,
        beta=0.5, max_steps=2, per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=1e-2,
        gradient_checkpointing=False, **{**CPU_ARGS, **settings},
    )  # fmt: skip
    trainer = RenyiDPOTrainer(
        model=str(tiny_model_dir), args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora_config()
    )
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    return trainer, dataset, out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_saved_ensemble_scores_the_training_pairs_as_the_trainer_does(tmp_path, tiny_model_dir, tokenizer, variant):
    trainer, dataset, out = train_and_save(tmp_path, tiny_model_dir, tokenizer, **VARIANTS[variant])
    trained = trainer.score_pairs(dataset)  # eval mode, the trainer's own ℓ_ik
    recorded = json.loads((out / "renyi_ensemble.json").read_text())["preference_likelihood"]
    assert recorded["beta"] == 0.5 and recorded == trainer.likelihood.to_metadata()
    ensemble = RenyiEnsemble.from_pretrained(str(out), base_model=str(tiny_model_dir), use_chat_template=False)
    assert ensemble.preference_likelihood() == trainer.likelihood
    predictions = ensemble.predict_preferences(PROMPTS, CHOSEN, REJECTED, reference=SingleModel.base_of(ensemble))
    scored = torch.stack([p.member_loglik[0] for p in predictions]).double()
    torch.testing.assert_close(scored, trained.loglik.double(), rtol=1e-4, atol=1e-5)
    # the members' probabilities are the Bradley–Terry σ(m) of the trained margins
    member_probs = torch.stack([p.member_probs[:, 0] for p in predictions]).double()
    torch.testing.assert_close(member_probs, torch.sigmoid(trained.margins.double()), rtol=1e-4, atol=1e-5)


def test_scoring_refuses_what_it_cannot_reproduce(tmp_path, tiny_model_dir, tokenizer):
    _, _, out = train_and_save(tmp_path, tiny_model_dir, tokenizer, ld_alpha=0.5)
    ensemble = RenyiEnsemble.from_pretrained(str(out), base_model=str(tiny_model_dir), use_chat_template=False)
    assert ensemble.preference_likelihood().ld_alpha == 0.5
    with pytest.raises(ValueError, match="ld_alpha=0.5"):
        ensemble.predict_preferences(PROMPTS, CHOSEN, REJECTED, reference=SingleModel.base_of(ensemble))
    with pytest.raises(ValueError, match="separate ref_model"):
        PreferenceLikelihood(reference="ref_model").check_scorable()


def test_an_ensemble_not_trained_on_preferences_needs_beta(tiny_model_dir, tokenizer):
    from trl_renyi.model.members import build_ensemble
    from trl_renyi.testing import tiny_llama

    ensemble = RenyiEnsemble(build_ensemble(tiny_llama(tokenizer), lora_config(), 2), tokenizer, alpha=1.0)
    with pytest.raises(ValueError, match="records no preference likelihood .* give beta"):
        ensemble.preference_likelihood()
    assert ensemble.preference_likelihood(beta=0.3) == PreferenceLikelihood(beta=0.3)


@pytest.mark.parametrize(
    "field, value, message",
    [("beta", 0.0, "beta must be a positive number"), ("label_smoothing", 0.5, r"label_smoothing .* \[0, 0.5\)"),
     ("loss_type", "hinge", "loss_type must be one of"), ("f_divergence_type", "tv", "f_divergence_type must be one of")],
)  # fmt: skip
def test_each_setting_is_checked_by_its_one_definition(field, value, message):
    with pytest.raises(ValueError, match=message):
        PreferenceLikelihood(**{field: value})
