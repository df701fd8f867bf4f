"""K LoRA members on a quantised frozen base (QLoRA, bitsandbytes 4-bit NF4 and 8-bit, on CPU).

Every member's output and gradients equal PEFT's own QLoRA layer with that adapter active; K = 1 equals TRL's
SFTTrainer and DPOTrainer on the same quantised base; members save and reload as plain PEFT adapters over the
quantised base; ``RenyiEnsemble.from_pretrained(..., quantization_config=...)`` loads one. Skipped without
bitsandbytes (the ``quantization`` extra); the refusal of an unservable quantised layer needs no bitsandbytes.
"""

import pytest
import torch
from peft import PeftModel

from tests.helpers import CPU_ARGS, assert_close_dicts, lora_config, lora_grads, loss_and_grads, renyi_settings
from trl_renyi.model.layer import member_names, member_routing, router_disabled
from trl_renyi.model.members import build_ensemble, tile_for_members


def quantization(bits: int):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    if bits == 4:
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    return transformers.BitsAndBytesConfig(load_in_8bit=True)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from trl_renyi.testing import tiny_llama, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    path = tmp_path_factory.mktemp("tiny_quantized_base")
    tiny_llama(tokenizer, init_std=0.5).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


def load_quantized(base_dir, bits):
    from trl_renyi.model.loading import load_causal_lm

    return load_causal_lm(base_dir, quantization_config=quantization(bits))


def batch_of(tokenizer, texts):
    return dict(tokenizer(texts, return_tensors="pt", padding=True))


TEXTS = ["What colour is the sky? It is blue.", "Say hello. Ahoy!", "Count to three."]


@pytest.mark.parametrize("bits", [4, 8])
def test_member_outputs_and_gradients_match_peft_qlora_layers(base_dir, tokenizer, bits):
    """Inside the routing, one forward serves K members on the quantised base; each member's logits and LoRA
    gradients equal PEFT's own QLoRA forward with that adapter active (the same layers, outside the routing), with
    the LoRA factors in bfloat16 as TRL keeps them on a quantised base."""
    from peft.tuners.lora import bnb as peft_bnb

    from trl_renyi.model.quantized import peft_quantized_layers

    model = build_ensemble(load_quantized(base_dir, bits), lora_config(), num_members=3, init_std=0.05)
    peft_class = peft_bnb.Linear4bit if bits == 4 else peft_bnb.Linear8bitLt
    layers = [m for m in model.modules() if isinstance(m, peft_class)]
    assert layers and all(type(m) is peft_quantized_layers()[peft_class] for m in layers)
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)  # as TRL does for a quantised base
    names = member_names(3)
    batch = batch_of(tokenizer, TEXTS)
    rows = batch["input_ids"].shape[0]
    with member_routing(model, rows_per_member=rows):
        logits = model(**tile_for_members(batch, 3)).logits
        logits.float().pow(2).mean().backward()
    batched = {n: lora_grads(model, n) for n in names}
    model.zero_grad()
    for k, name in enumerate(names):
        with router_disabled(model):
            model.base_model.set_adapter(name)  # PEFT's own single-adapter forward of the same layers
            model.base_model.set_requires_grad(names, requires_grad=True)
            reference = model(**batch).logits
            (reference.float().pow(2).sum() / (3 * reference.numel())).backward()
        torch.testing.assert_close(logits[k * rows : (k + 1) * rows], reference, rtol=1e-5, atol=1e-5)
        assert_close_dicts(batched[name], lora_grads(model, name), rtol=2e-2, scaled=True)
        model.zero_grad()


@pytest.mark.parametrize("bits", [4, 8])
def test_members_save_and_reload_as_plain_peft_adapters(base_dir, tokenizer, tmp_path, bits):
    """Saved members load with plain ``PeftModel.from_pretrained`` over a freshly quantised base (PEFT's own QLoRA
    layers, no routing) and give member k's block of the member-batched forward."""
    from trl_renyi.model.layer import MemberBatchedLayer

    model = build_ensemble(load_quantized(base_dir, bits), lora_config(), num_members=2, init_std=0.1)
    model.save_pretrained(str(tmp_path))
    batch = batch_of(tokenizer, TEXTS)
    rows = batch["input_ids"].shape[0]
    with torch.no_grad(), member_routing(model, rows_per_member=rows):
        logits = model(**tile_for_members(batch, 2)).logits
    for k, name in enumerate(member_names(2)):
        plain = PeftModel.from_pretrained(load_quantized(base_dir, bits), str(tmp_path / name))
        assert not any(isinstance(m, MemberBatchedLayer) for m in plain.modules())
        with torch.no_grad():
            torch.testing.assert_close(plain(**batch).logits, logits[k * rows : (k + 1) * rows], rtol=1e-5, atol=1e-5)


def _trainer(cls, config_cls, base_dir, dataset, tokenizer, tmp_path, bits, as_argument=False, **overrides):
    """A trainer on the quantised base given by name: ``quantization_config`` in ``model_init_kwargs`` (as TRL's
    scripts pass ``--load_in_4bit``) or, with ``as_argument``, as the trainer's own argument."""
    settings = dict(CPU_ARGS, per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2)
    init_kwargs = {"dtype": torch.float32}
    if not as_argument:
        init_kwargs["quantization_config"] = quantization(bits)
    settings.update(model_init_kwargs=init_kwargs, **overrides)
    args = config_cls(output_dir=str(tmp_path / cls.__name__), **renyi_settings(config_cls, settings))
    extra = {"quantization_config": quantization(bits)} if as_argument else {}
    return cls(
        model=base_dir, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora_config(), **extra
    )


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_k1_matches_sft_trainer_on_a_4bit_base(
    base_dir, tokenizer, prompt_completion_dataset, tmp_path, gradient_checkpointing
):
    from trl import SFTConfig, SFTTrainer

    from trl_renyi import RenyiSFTConfig, RenyiSFTTrainer

    common = dict(gradient_checkpointing=gradient_checkpointing)
    stock = _trainer(SFTTrainer, SFTConfig, base_dir, prompt_completion_dataset, tokenizer, tmp_path, 4, **common)
    ours = _trainer(
        RenyiSFTTrainer, RenyiSFTConfig, base_dir, prompt_completion_dataset, tokenizer, tmp_path, 4,
        num_members=1, alpha=-1.0, **common,
    )  # fmt: skip
    assert getattr(ours.model, "is_loaded_in_4bit", False)
    loss_ref, grads_ref, _ = loss_and_grads(stock, "default", gradient_checkpointing)
    loss, grads, _ = loss_and_grads(ours, "member_0", gradient_checkpointing)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    assert any(g.abs().sum() > 0 for g in grads.values())
    assert_close_dicts(grads, grads_ref, rtol=1e-2, scaled=True)  # bfloat16 LoRA factors, as TRL keeps them


def test_k1_matches_dpo_trainer_on_a_4bit_base(base_dir, tokenizer, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from trl_renyi import RenyiDPOConfig, RenyiDPOTrainer

    pairs = [("What colour is the sky?", " It is blue.", " green"), ("Say hello.", " Good morning.", " Ahoy!")] * 2
    dataset = Dataset.from_dict({"prompt": [p for p, _, _ in pairs], "chosen": [c for _, c, _ in pairs],
                                 "rejected": [r for _, _, r in pairs]})  # fmt: skip
    common = dict(beta=0.5, gradient_checkpointing=True)
    stock = _trainer(DPOTrainer, DPOConfig, base_dir, dataset, tokenizer, tmp_path, 4, **common)
    ours = _trainer(
        RenyiDPOTrainer, RenyiDPOConfig, base_dir, dataset, tokenizer, tmp_path, 4, as_argument=True, num_members=1,
        alpha=-1.0, **common,
    )  # fmt: skip
    loss_ref, grads_ref, _ = loss_and_grads(stock, "default", True)
    loss, grads, _ = loss_and_grads(ours, "member_0", True)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    assert any(g.abs().sum() > 0 for g in grads.values())
    assert_close_dicts(grads, grads_ref, rtol=1e-2, scaled=True)


def test_ensemble_trains_saves_and_reloads_on_a_4bit_base(base_dir, tokenizer, prompt_completion_dataset, tmp_path, caplog):
    """K = 2 trains on the NF4 base (the quantised weights stay frozen), and ``RenyiEnsemble.from_pretrained`` with a
    ``quantization_config`` rebuilds it over a quantised base with the same member outputs."""
    from trl_renyi import RenyiEnsemble, RenyiSFTConfig, RenyiSFTTrainer

    trainer = _trainer(
        RenyiSFTTrainer, RenyiSFTConfig, base_dir, prompt_completion_dataset, tokenizer, tmp_path, 4,
        as_argument=True, num_members=2, member_init_std=0.05, max_steps=2,
    )  # fmt: skip
    assert trainer.model.get_base_model().is_loaded_in_4bit
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    caplog.set_level("INFO", logger="trl_renyi")
    trainer.train()
    assert "The base model is loaded in 4 bit (nf4, compute dtype" in caplog.text  # the run says so when it starts
    assert all(torch.equal(p, frozen[n]) for n, p in trainer.model.named_parameters() if n in frozen)
    out = tmp_path / "ensemble"
    trainer.save_model(str(out))
    reloaded = RenyiEnsemble.from_pretrained(str(out), base_model=base_dir, quantization_config=quantization(4))
    assert reloaded.model.get_base_model().is_loaded_in_4bit
    for param in trainer.model.parameters():  # TRL trains them in bfloat16; PEFT loads adapters in float32
        if param.requires_grad:
            param.data = param.data.float()
    batch = batch_of(tokenizer, TEXTS)
    trainer.model.eval()  # both scored in inference mode (bitsandbytes' CPU matmul takes another path in training)
    expected = trainer.ensemble.member_forward(batch).logits
    torch.testing.assert_close(reloaded.member_forward(batch).logits, expected, rtol=1e-4, atol=1e-4)


def test_unservable_quantized_layer_is_refused_by_name(make_model):
    """A quantised ``nn.Linear`` subclass other than bitsandbytes' (an integer weight) is refused, naming its type."""

    class Int8Linear(torch.nn.Linear):
        def __init__(self, linear):
            super().__init__(linear.in_features, linear.out_features, bias=False)
            self.weight = torch.nn.Parameter(torch.zeros_like(linear.weight, dtype=torch.int8), requires_grad=False)

    model = make_model()
    attention = model.model.layers[0].self_attn
    attention.q_proj = Int8Linear(attention.q_proj)
    with pytest.raises(ValueError, match="Int8Linear"):
        build_ensemble(model, lora_config(target_modules=["q_proj"]), num_members=2)


def test_load_causal_lm_quantizes_a_base(base_dir):
    model = load_quantized(base_dir, 4)
    assert model.is_loaded_in_4bit and model.device.type == "cpu"
