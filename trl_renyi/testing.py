"""Tiny, fully offline models and tokenizers for tests, smoke runs and examples.

``tiny_tokenizer()`` trains a byte-level BPE tokenizer locally with the ``tokenizers`` library (ChatML template,
``<|im_end|>`` as eos, ``<|pad|>`` as pad); ``tiny_llama()`` builds a 2-layer Llama with hidden size 64 on it.
A tiny random Llama with the default init (std 0.02) has near-zero logits that LoRA can hardly move; pass
``init_std=0.5`` for anything that must learn.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The sky is blue. The grass is green. What colour is the sky? It is blue.",
    "What is two plus three? Five. What is the capital of France? Paris.",
    "Hello there! Ahoy matey! Good morning, sir. Greetings and salutations.",
    "one two three four five six seven eight nine ten un deux trois quatre cinq",
    "user assistant system answer question yes no maybe red orange yellow purple",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 + - = ? ! .",
]


def tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in memory, with a ChatML chat template and eos/pad in its vocabulary."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|pad|>", bos_token=None, unk_token=None
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_llama(
    tokenizer: PreTrainedTokenizerFast,
    seed: int = 0,
    init_std: float = 0.02,
    hidden_size: int = 64,
    num_layers: int = 2,
    dtype: torch.dtype = torch.float32,
) -> LlamaForCausalLM:
    """A tiny Llama over ``tokenizer``'s vocabulary; ``init_std`` is the std of its Linear and Embedding weights."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0.0, init_std)
                if isinstance(module, torch.nn.Linear) and module.bias is not None:
                    module.bias.zero_()
    model.config.name_or_path = ""
    return model.to(dtype)
