"""The member-batched LoRA layer: a layer type PEFT creates itself, stock PEFT behaviour outside routing, an exact
routed layout inside it."""

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.utils import get_peft_model_state_dict

from tests.helpers import CPU_ARGS, lora_config, set_random_lora_b
from trl_renyi import RenyiEnsemble, RenyiSFTConfig, RenyiSFTTrainer, build_ensemble
from trl_renyi.model.layer import MemberBatchedLinear, get_router, member_names, member_routing
from trl_renyi.model.members import tile_for_members

K = 3


def _batch(tokenizer, rows: int):
    texts = ["Say hello.", "What colour is the sky?", "Count to three.", "Name a colour.", "Good morning.", "Paris."]
    encoded = tokenizer(texts[:rows], return_tensors="pt", padding=True)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def _stock_reference(base, lora, ensemble, adapter: str):
    """A stock PEFT model (no member layers) holding ``adapter``'s weights as its only adapter."""
    reference = get_peft_model(base, copy.deepcopy(lora), adapter_name=adapter)
    set_peft_model_state_dict(reference, get_peft_model_state_dict(ensemble, adapter_name=adapter), adapter_name=adapter)
    assert not any(isinstance(m, MemberBatchedLinear) for m in reference.modules())
    return reference.eval()


@pytest.fixture
def ensemble_and_reference(tokenizer, make_model):
    lora = lora_config()
    base_copy = make_model(seed=1)
    peft_model = build_ensemble(make_model(seed=1), lora, K, seed=0, init_std=0.05)
    set_random_lora_b(peft_model)
    peft_model.eval()
    reference = _stock_reference(base_copy, lora, peft_model, peft_model.active_adapter)
    return peft_model, reference


def test_peft_creates_the_member_layer_and_keeps_state_dict_keys(ensemble_and_reference):
    peft_model, reference = ensemble_and_reference
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLinear)]
    assert layers and all(type(m) is MemberBatchedLinear for m in layers)
    ours = get_peft_model_state_dict(peft_model, adapter_name="member_0")
    stock = get_peft_model_state_dict(reference, adapter_name="member_0")
    assert sorted(ours) == sorted(stock)


def test_plain_forward_of_k_times_b_rows_is_stock_peft(tokenizer, ensemble_and_reference):
    peft_model, reference = ensemble_and_reference
    batch = _batch(tokenizer, 2)
    tiled = tile_for_members(batch, K)  # K·B rows: routing would split them, but routing is off outside the block
    with torch.no_grad():
        ours = peft_model(**tiled).logits
        stock = reference(**tiled).logits
        routed_rows = None
        with member_routing(peft_model, rows_per_member=2):
            routed_rows = peft_model(**tiled).logits
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-6)
    # inside the block the rows of member k differ from the active adapter's (k >= 1): routing really is opt-in
    assert not torch.allclose(routed_rows[2:4], stock[2:4], atol=1e-4)
    torch.testing.assert_close(routed_rows[:2], stock[:2], rtol=1e-5, atol=1e-6)


def test_generate_on_the_ensembles_model_is_stock_peft(tokenizer, ensemble_and_reference):
    peft_model, reference = ensemble_and_reference
    ensemble = RenyiEnsemble(peft_model, tokenizer)
    batch = _batch(tokenizer, 1)
    tiled = tile_for_members(batch, K)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        ours = ensemble.model.generate(**tiled, **kwargs)
        stock = reference.generate(**tiled, **kwargs)
    assert torch.equal(ours, stock)


@pytest.mark.parametrize("bf16_autocast", [False, True])
def test_routed_rows_equal_each_member_alone(tokenizer, make_model, bf16_autocast):
    lora = lora_config()
    peft_model = build_ensemble(make_model(seed=2), lora, K, seed=0, init_std=0.05).eval()
    set_random_lora_b(peft_model)
    batch = _batch(tokenizer, 2)
    precision = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast)
    with torch.no_grad(), precision, member_routing(peft_model, rows_per_member=2):
        routed = peft_model(**tile_for_members(batch, K)).logits.float()
    for k, name in enumerate(member_names(K)):
        reference = _stock_reference(make_model(seed=2), lora, peft_model, name)
        with torch.no_grad():
            alone = reference(**batch).logits
        if not bf16_autocast:
            torch.testing.assert_close(routed[2 * k : 2 * k + 2], alone, rtol=1e-5, atol=1e-5)
            continue
        # mixed precision (TRL's bf16=True): as close to the float32 member as stock PEFT under the same autocast
        with torch.no_grad(), precision:
            stock = reference(**batch).logits.float()
        ours_error = (routed[2 * k : 2 * k + 2] - alone).abs().max()
        stock_error = (stock - alone).abs().max()
        assert ours_error <= 1.5 * stock_error + 1e-3, (ours_error, stock_error)
        if k:  # member k differs from member 0 by far more than the rounding: the comparison is not vacuous
            assert (alone - routed[:2]).abs().max() > 5 * ours_error


@pytest.mark.parametrize("rows", [5, 6])
def test_routing_checks_the_layout_exactly(tokenizer, ensemble_and_reference, rows):
    peft_model, _ = ensemble_and_reference
    batch = _batch(tokenizer, rows)  # 6 rows divide by K = 3 but are not 3 blocks of 1
    with torch.no_grad(), member_routing(peft_model, rows_per_member=1), pytest.raises(ValueError, match="blocks of 1"):
        peft_model(**batch)


def test_ensemble_constructor_changes_no_trainable_flag(tokenizer, make_model):
    peft_model = build_ensemble(make_model(), lora_config(), K, seed=0)
    for name, parameter in peft_model.named_parameters():
        parameter.requires_grad_("member_0" in name)
    before = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    ensemble = RenyiEnsemble(peft_model, tokenizer)
    assert before == {n: p.requires_grad for n, p in peft_model.named_parameters()}
    assert "num_members=3" in repr(ensemble) and "alpha=-1.0" in repr(ensemble)
    assert "base_model='<LlamaForCausalLM in memory>'" in repr(ensemble)  # no name to show: say what it is


def test_saved_member_loads_as_stock_peft(tmp_path, tokenizer, ensemble_and_reference, make_model):
    peft_model, _ = ensemble_and_reference
    RenyiEnsemble(peft_model, tokenizer).save_pretrained(tmp_path)
    plain = PeftModel.from_pretrained(make_model(seed=1), str(tmp_path / "member_1")).eval()
    assert not any(isinstance(m, MemberBatchedLinear) for m in plain.modules())
    loaded = RenyiEnsemble.from_pretrained(tmp_path, base_model=make_model(seed=1), tokenizer=tokenizer)
    assert all(type(m) is MemberBatchedLinear for m in loaded.model.modules() if isinstance(m, LoraLinear))
    batch = _batch(tokenizer, 2)
    with torch.no_grad():
        logits = loaded.member_logits(batch)
        alone = plain(**batch).logits
    torch.testing.assert_close(logits[1], alone, rtol=1e-5, atol=1e-5)
    assert get_router(loaded.model).routing is None  # no routing left on after scoring


def test_compute_loss_with_checkpointing_outside_routing_is_refused(tmp_path, tokenizer, make_model, prompt_completion_dataset):
    args = RenyiSFTConfig(output_dir=str(tmp_path), num_members=2, max_steps=1, per_device_train_batch_size=2, **CPU_ARGS)
    trainer = RenyiSFTTrainer(
        model=make_model(), args=args, train_dataset=prompt_completion_dataset, processing_class=tokenizer,
        peft_config=lora_config(),
    )
    model = trainer.model
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    with pytest.raises(RuntimeError, match="member_routing"):
        trainer.compute_loss(model, batch)
    with trainer.member_routing(model):
        loss = trainer.compute_loss(model, batch)
        loss.backward()
    assert get_router(model).routing is None
    assert all(p.grad is not None for n, p in model.named_parameters() if "member_1" in n and "lora_" in n)
