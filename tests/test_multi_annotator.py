"""Multi-annotator rows: a weighted row trains exactly like its expanded one-completion rows; ChaosNLI converter (a
research converter, kept with the studies in experiments/chaosnli.py)."""

import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from tests.helpers import CPU_ARGS, PLAIN_OBJECTIVE, assert_close_dicts, first_batch, lora_config, step_grads
from trl_renyi import RenyiSFTConfig, RenyiSFTTrainer
from trl_renyi.data.multi_completion import expand_multi_completion

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from chaosnli import chaosnli_to_multi_completion, chaosnli_to_prompt_completion  # noqa: E402
from trl_renyi.model.members import member_names

ROWS = {
    "prompt": ["Premise: a dog runs. Hypothesis: an animal moves. Label:", "Is the sky green? Answer:"],
    "completions": [[" entailment", " neutral", " contradiction"], [" no", " yes"]],
    "completion_weights": [[3, 1, 0], [1, 2]],
}


def make(model, dataset, tokenizer, tmp_path, **overrides):
    kwargs = dict(CPU_ARGS, **PLAIN_OBJECTIVE)
    kwargs.update(per_device_train_batch_size=len(dataset) * 4, max_steps=1, learning_rate=1e-2, num_members=2)
    kwargs.update(overrides)
    args = RenyiSFTConfig(output_dir=str(tmp_path / "out"), **kwargs)
    return RenyiSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                           peft_config=lora_config())


def randomise_members(model, seed=7):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(alpha=-1.0),
        dict(alpha=0.5, gradient_checkpointing=True),
        dict(alpha=-1.0, padding_free=True, max_length=None),
        dict(alpha=-1.0, loglik_reduction="mean"),
        dict(alpha=-1.0, responsibility_floor=0.2),
    ],
)
def test_weighted_row_equals_expanded_rows(make_model, tokenizer, tmp_path, overrides):
    weighted = Dataset.from_dict(ROWS)
    expanded = expand_multi_completion(weighted, keep_weights=False)
    assert len(expanded) == 7
    results = []
    for dataset in (weighted, expanded):
        trainer = make(make_model(), dataset, tokenizer, tmp_path, **overrides)
        randomise_members(trainer.model)
        results.append(step_grads(trainer, checkpointing=overrides.get("gradient_checkpointing", False)))
    (loss_w, grads_w), (loss_e, grads_e) = results
    torch.testing.assert_close(loss_w, loss_e, rtol=1e-5, atol=0)
    for name in member_names(2):
        assert any(g.abs().sum() > 0 for g in grads_e[name].values())
        assert_close_dicts(grads_w[name], grads_e[name], rtol=1e-5, scaled=True)


def test_weights_change_the_loss(make_model, tokenizer, tmp_path):
    """Control: dropping the weights (every completion once) gives another loss, so the test above can fail."""
    weighted = Dataset.from_dict(ROWS)
    unweighted = Dataset.from_dict({k: v for k, v in ROWS.items() if k != "completion_weights"})
    losses = []
    for dataset in (weighted, unweighted):
        trainer = make(make_model(), dataset, tokenizer, tmp_path, alpha=-1.0)
        randomise_members(trainer.model)
        losses.append(step_grads(trainer, checkpointing=False)[0])
    assert abs(float(losses[0] - losses[1])) > 1e-4


def test_weighted_rows_refuse_gradient_accumulation(make_model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        make(make_model(), Dataset.from_dict(ROWS), tokenizer, tmp_path, gradient_accumulation_steps=2)


SNLI = {
    "uid": "a", "label_count": [10, 60, 30], "label_dist": [0.1, 0.6, 0.3], "majority_label": "n",
    "example": {"uid": "a", "premise": "A man sleeps.", "hypothesis": "A person rests.", "source": "snli_agree_3"},
    "old_label": "n", "old_labels": ["neutral", "neutral", "contradiction", "entailment", "neutral"],
}
ANLI = {
    "uid": "b", "label_count": [37, 63], "label_dist": [0.37, 0.63], "majority_label": 2,
    "example": {"uid": "b", "obs1": "Stan felt sick.", "obs2": "Stan recovered.", "hyp1": "He ran.",
                "hyp2": "He rested.", "source": "abdnli_dev"},
    "old_label": 2,
}


def test_chaosnli_converter_original_votes():
    multi = chaosnli_to_multi_completion([SNLI, ANLI], labels="original")
    assert multi["completions"][0] == [" entailment", " neutral", " contradiction"]
    assert multi["completion_weights"][0] == [1, 3, 1]
    assert multi["completions"][1] == [" 1", " 2"] and multi["completion_weights"][1] == [0, 1]
    assert "A man sleeps." in multi["prompt"][0] and "Stan recovered." in multi["prompt"][1]
    flat = chaosnli_to_prompt_completion([SNLI, ANLI], labels="original")
    assert len(flat["prompt"]) == 6 and flat["completion"].count(" neutral") == 3


def test_chaosnli_converter_sampled_votes():
    import random

    multi = chaosnli_to_multi_completion([SNLI] * 200, labels="sampled:5", rng=random.Random(0))
    totals = torch.tensor(multi["completion_weights"], dtype=torch.float).sum(0)
    assert all(sum(w) == 5 for w in multi["completion_weights"])
    torch.testing.assert_close(totals / totals.sum(), torch.tensor([0.1, 0.6, 0.3]), atol=0.03, rtol=0)
    with pytest.raises(ValueError, match="labels"):
        chaosnli_to_multi_completion([SNLI], labels="bogus")


# ------------------------------------------------------------------------------------- routing a row as one example
def make_routed(model, tokenizer, tmp_path, routing, **overrides):
    return make(model, Dataset.from_dict(ROWS), tokenizer, tmp_path, multi_annotator_routing=routing, **overrides)


@pytest.mark.parametrize(
    "overrides",
    [dict(alpha=1.0), dict(alpha=1.0, responsibility_floor=0.2, gradient_checkpointing=True), dict(alpha=-1.0, num_members=1)],
    ids=["alpha1", "alpha1_floor_checkpointing", "k1"],
)
def test_row_routing_equals_completion_routing_where_the_bound_is_linear(make_model, tokenizer, tmp_path, overrides):
    """At α = 1 the bound is linear in ℓ and with K = 1 it is ℓ itself: routing a row or its completions is the same."""
    results = []
    for routing in ("row", "completion"):
        trainer = make_routed(make_model(), tokenizer, tmp_path, routing, **overrides)
        randomise_members(trainer.model)
        results.append(step_grads(trainer, checkpointing=overrides.get("gradient_checkpointing", False)))
    (loss_r, grads_r), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_r, loss_c, rtol=1e-5, atol=0)
    for name in grads_c:
        assert_close_dicts(grads_r[name], grads_c[name], rtol=1e-5, scaled=True)


def test_row_routing_is_the_bound_of_each_rows_summed_annotations(make_model, tokenizer, tmp_path):
    """α = −1, K = 2: the loss is −Σ_i J(Σ_j w_ij ℓ_ij·) / Σ_ij w_ij n_ij, from the completions' own ℓ (float64)."""
    from trl_renyi.objective import renyi_bound

    completion = make_routed(make_model(), tokenizer, tmp_path, "completion", alpha=-1.0)
    routed = make_routed(make_model(), tokenizer, tmp_path, "row", alpha=-1.0)
    randomise_members(completion.model)
    randomise_members(routed.model)
    batch, routed_batch = first_batch(completion), first_batch(routed)
    assert "row_index" not in batch
    rows = routed_batch["row_index"]
    assert sorted(rows.tolist()) == [0, 0, 1, 1]  # two rows, two completions with a positive weight each
    torch.testing.assert_close(batch["completion_weights"], routed_batch["completion_weights"])
    with torch.no_grad(), completion.member_routing(completion.model):
        step = completion.member_loglik(completion.model, batch)
    assert step.loglik.shape == (4, 2)
    weights = batch["completion_weights"].double()
    row_loglik = torch.zeros(2, 2, dtype=torch.float64).index_add(0, rows, weights[:, None] * step.loglik.double())
    tokens = (weights * step.num_tokens.double()).sum()
    expected = -renyi_bound(row_loglik, -1.0).value.sum() / tokens
    with torch.no_grad(), routed.member_routing(routed.model):
        loss = routed.compute_loss(routed.model, routed_batch)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    per_completion = -step.weighted_sum(renyi_bound(step.loglik, -1.0).value) / tokens
    assert abs(float(loss) - float(per_completion)) > 1e-4  # the two routings differ at α < 1


def test_row_routing_needs_shared_prompts_and_summed_logliks(make_model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="multi_annotator_routing='row'.*share_prompt"):
        make_routed(make_model(), tokenizer, tmp_path, "row", share_prompt=False)
    with pytest.raises(ValueError, match="loglik_reduction='sum'"):
        make_routed(make_model(), tokenizer, tmp_path, "row", loglik_reduction="mean")


@pytest.mark.parametrize("share_prompt", [True, False])
def test_trainer_train_logs_the_expanded_rows_loss(make_model, tokenizer, tmp_path, share_prompt):
    """Through Trainer.train() the Trainer passes num_items_in_batch, its unweighted count of label tokens: weighted
    rows must still be normalised by their weighted count, as their expansion is."""
    losses = []
    for dataset in (Dataset.from_dict(ROWS), expand_multi_completion(Dataset.from_dict(ROWS), keep_weights=False)):
        trainer = make(make_model(), dataset, tokenizer, tmp_path, alpha=-1.0, share_prompt=share_prompt)
        randomise_members(trainer.model)
        trainer.train()
        losses.append(trainer.state.log_history[0]["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
