"""Routing by source (``source_column``): the bound over sources against independent computations, its exact cases
(K = 1, α = 1, one row per source) through the trainer, and the stochastic-EM memory."""

import math

import pytest
import torch
from datasets import Dataset

from tests.helpers import CPU_ARGS, PLAIN_OBJECTIVE, assert_close_dicts, lora_config, step_grads
from tests.test_multi_annotator import randomise_members
from trl_renyi import RenyiSFTConfig, RenyiSFTTrainer
from trl_renyi.model.members import member_names
from trl_renyi.objective import floored_renyi_bound, source_renyi_bound
from trl_renyi.training.source_routing import SourceMemory


def explicit_source_bound(loglik, sources, others, alpha, weights):
    """J_s(O + Σ w ℓ) − J_s(O) in float64, written out with plain loops (uniform π)."""
    k = loglik.shape[1]
    values = []
    for s in range(others.shape[0]):
        total = others[s].clone()
        for i in range(loglik.shape[0]):
            if sources[i] == s:
                total = total + weights[i] * loglik[i]

        def j(v):
            if alpha == 1.0:
                return v.mean()
            return torch.logsumexp((1 - alpha) * v - math.log(k), 0) / (1 - alpha)

        values.append(j(total) - j(others[s]))
    return torch.stack(values)


@pytest.mark.parametrize("alpha", [-1.0, 0.0, 0.5, 1.0, 2.0])
def test_source_bound_matches_its_definition_and_gradient(alpha):
    generator = torch.Generator().manual_seed(0)
    loglik = (torch.randn(7, 3, generator=generator, dtype=torch.float64) * 2).requires_grad_()
    sources = torch.tensor([0, 2, 0, 1, 2, 2, 0])
    others = torch.randn(3, 3, generator=generator, dtype=torch.float64) * 5
    weights = torch.rand(7, generator=generator, dtype=torch.float64) + 0.5
    bound = source_renyi_bound(loglik, sources, others, alpha, example_weights=weights)
    expected = explicit_source_bound(loglik, sources, others, alpha, weights)
    torch.testing.assert_close(bound.value, expected)
    (grad,) = torch.autograd.grad(bound.value.sum(), loglik)
    (expected_grad,) = torch.autograd.grad(expected.sum(), loglik)
    torch.testing.assert_close(grad, expected_grad)
    # ∂J_s/∂ℓ_ik = w_i r_sk: the reported responsibilities are the source's, shared by its examples
    torch.testing.assert_close(grad, weights[:, None] * bound.responsibilities)
    assert torch.equal(bound.responsibilities[0], bound.responsibilities[2])


def test_source_bound_exact_cases():
    generator = torch.Generator().manual_seed(1)
    loglik = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    # one unit-weight row per source and nothing else remembered: the per-example bound, floor included
    one_each = source_renyi_bound(loglik, torch.arange(6), torch.zeros(6, 4, dtype=torch.float64), -1.0, floor=0.2)
    torch.testing.assert_close(one_each.value, floored_renyi_bound(loglik, -1.0, floor=0.2).value)
    sources, others = torch.tensor([0, 0, 1, 1, 1, 0]), torch.randn(2, 4, generator=generator, dtype=torch.float64)
    # α = 1: linear, Σ_i Σ_k π_k ℓ_ik whatever the memory
    linear = source_renyi_bound(loglik, sources, others, 1.0)
    torch.testing.assert_close(linear.value.sum(), loglik.mean(-1).sum())
    # K = 1: Σ_i ℓ_i at any α
    single = source_renyi_bound(loglik[:, :1], sources, others[:, :1], -3.0)
    torch.testing.assert_close(single.value.sum(), loglik[:, 0].sum())


def test_memory_replaces_the_batch_share_of_a_source():
    memory = SourceMemory(["a", "b"], torch.tensor([4.0, 2.0]), num_members=2)
    memory.loglik = torch.tensor([[-8.0, -4.0], [-2.0, -6.0]], dtype=torch.float64)
    unique, local, others = memory.batch_view(torch.tensor([1, 0, 1]), torch.tensor([1.0, 1.0, 1.0]))
    assert unique.tolist() == [0, 1] and local.tolist() == [1, 0, 1]
    # source a: 1 of its 4 rows in the batch keeps 3/4 of the memory; source b: both rows in the batch keep nothing
    torch.testing.assert_close(others, torch.tensor([[-6.0, -3.0], [0.0, 0.0]], dtype=torch.float64))
    memory.update(unique, torch.tensor([[-1.0, -2.0], [-3.0, -4.0]]))
    torch.testing.assert_close(memory.loglik, torch.tensor([[-1.0, -2.0], [-3.0, -4.0]], dtype=torch.float64))


ROWS = {
    "prompt": ["Is the sky green? Answer:", "Is grass green? Answer:", "Is snow hot? Answer:"],
    "completions": [[" no", " yes", " no"], [" yes", " no"], [" no", " yes"]],
    "completion_weights": [[1, 1, 1], [1, 1], [1, 1]],
    "annotator": [["ann1", "ann2", "ann3"], ["ann1", "ann2"], ["ann3", "ann1"]],
}


def make(model, dataset, tokenizer, tmp_path, **overrides):
    kwargs = dict(CPU_ARGS, **PLAIN_OBJECTIVE)
    kwargs.update(per_device_train_batch_size=16, max_steps=1, learning_rate=1e-2, num_members=2)
    kwargs.update(overrides)
    args = RenyiSFTConfig(output_dir=str(tmp_path / "out"), **kwargs)
    return RenyiSFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora_config()
    )


def unique_sources(rows):
    """The same rows with a different source for every vote (one row per source)."""
    counter = iter(range(100))
    return {**rows, "annotator": [[f"s{next(counter)}" for _ in votes] for votes in rows["annotator"]]}


@pytest.mark.parametrize("share_prompt", [True, False])
@pytest.mark.parametrize(
    "overrides,rows",
    [
        (dict(alpha=-1.0), "unique"),  # one row per source: the per-row bound
        (dict(alpha=-1.0, responsibility_floor=0.3), "unique"),
        (dict(alpha=1.0), "shared"),  # α = 1: linear
        (dict(alpha=-2.0, num_members=1), "shared"),  # K = 1
    ],
)
def test_source_routing_equals_the_per_row_loss_where_it_must(make_model, tokenizer, tmp_path, overrides, rows, share_prompt):
    data = unique_sources(ROWS) if rows == "unique" else ROWS
    routed = Dataset.from_dict(data)
    plain = Dataset.from_dict({k: v for k, v in data.items() if k != "annotator"})
    results = []
    for dataset, extra in ((routed, dict(source_column="annotator")), (plain, {})):
        trainer = make(make_model(), dataset, tokenizer, tmp_path, share_prompt=share_prompt, **overrides, **extra)
        if extra:
            assert trainer.source_memory is not None and trainer.source_memory.num_sources == len(
                {s for votes in data["annotator"] for s in votes}
            )
        randomise_members(trainer.model)
        results.append(step_grads(trainer, checkpointing=False))
    (loss_s, grads_s), (loss_p, grads_p) = results
    torch.testing.assert_close(loss_s, loss_p, rtol=1e-5, atol=1e-7)
    for name in member_names(overrides.get("num_members", 2)):
        assert any(g.abs().sum() > 0 for g in grads_p[name].values())
        assert_close_dicts(grads_s[name], grads_p[name], rtol=1e-5, scaled=True)


def test_source_routing_routes_a_source_as_one(make_model, tokenizer, tmp_path):
    """With sources shared across rows the bound differs from the per-row one, every example of a source gets the
    same responsibilities, and a training step fills the memory with each source's summed log-likelihoods."""
    trainer = make(make_model(), Dataset.from_dict(ROWS), tokenizer, tmp_path, alpha=-1.0, source_column="annotator")
    randomise_members(trainer.model)
    memory = trainer.source_memory
    assert memory.total_weight.tolist() == [3.0, 2.0, 2.0]  # ann1, ann2, ann3 (order of first appearance)
    assert memory.loglik.abs().sum() == 0
    step_grads(trainer, checkpointing=False)
    assert (memory.loglik < 0).all()
    responsibilities = memory.responsibilities(trainer.objective.log_weights, -1.0)
    assert torch.allclose(responsibilities.sum(-1), torch.ones(3, dtype=torch.float64))


def test_source_routing_refusals(make_model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="source_column 'who' is not a column"):
        make(make_model(), Dataset.from_dict(ROWS), tokenizer, tmp_path, source_column="who")
    with pytest.raises(ValueError, match="choose one"):
        RenyiSFTConfig(output_dir=str(tmp_path), source_column="annotator", multi_annotator_routing="row")
    bad = {**ROWS, "annotator": [["ann1"], ["ann1", "ann2"], ["ann3", "ann1"]]}
    with pytest.raises(ValueError, match="1 sources for 3 completions"):
        make(make_model(), Dataset.from_dict(bad), tokenizer, tmp_path, source_column="annotator")
    with pytest.raises(ValueError, match="member_chunk_size"):
        make(make_model(), Dataset.from_dict(ROWS), tokenizer, tmp_path, source_column="annotator", member_chunk_size=1)


def test_plain_rows_with_a_source_column(make_model, tokenizer, tmp_path):
    rows = {"prompt": ["Is the sky green? Answer:"] * 2, "completion": [" no", " yes"], "who": ["a", "b"]}
    trainer = make(make_model(), Dataset.from_dict(rows), tokenizer, tmp_path, alpha=-1.0, source_column="who")
    assert trainer.source_memory.names == ["a", "b"]
    loss, _ = step_grads(trainer, checkpointing=False)
    assert torch.isfinite(loss)


def test_source_memory_is_saved_with_checkpoints_and_restored_on_resume(make_model, tokenizer, tmp_path):
    """A checkpoint holds the memory (``source_routing.pt``); resuming restores it, so the stochastic EM goes on
    from the sources' tracked log-likelihoods instead of from an empty memory."""
    from trl_renyi.training.source_routing import MEMORY_FILE

    dataset = Dataset.from_dict(ROWS)
    first = make(make_model(), dataset, tokenizer, tmp_path, alpha=-1.0, source_column="annotator",
                 save_strategy="steps", save_steps=1, max_steps=1)
    first.train()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert (checkpoint / MEMORY_FILE).is_file()
    assert (first.source_memory.loglik < 0).all()

    second = make(make_model(), dataset, tokenizer, tmp_path, alpha=-1.0, source_column="annotator")
    assert second.source_memory.loglik.abs().sum() == 0
    second._load_from_checkpoint(str(checkpoint))
    torch.testing.assert_close(second.source_memory.loglik, first.source_memory.loglik)

    resumed = make(make_model(), dataset, tokenizer, tmp_path, alpha=-1.0, source_column="annotator",
                   save_strategy="steps", save_steps=1, max_steps=2)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 2 and (tmp_path / "out" / "checkpoint-2" / MEMORY_FILE).is_file()

    other = make(make_model(), Dataset.from_dict(unique_sources(ROWS)), tokenizer, tmp_path, alpha=-1.0,
                 source_column="annotator")
    with pytest.raises(ValueError, match="same data"):
        other._load_from_checkpoint(str(checkpoint))
