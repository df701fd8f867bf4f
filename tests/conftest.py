import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from trl_renyi.testing import tiny_llama, tiny_tokenizer  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def make_model(tokenizer):
    def factory(seed: int = 0, init_std: float = 0.5, **kwargs):
        return tiny_llama(tokenizer, seed=seed, init_std=init_std, **kwargs)

    return factory


@pytest.fixture
def tiny_model_dir(make_model, tokenizer, tmp_path):
    """A tiny Llama and its tokenizer saved to a folder, for commands that load a model by path."""
    path = tmp_path / "tiny-llama"
    make_model().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


PROMPTS = [
    "What colour is the sky?",
    "What is two plus three?",
    "Say hello.",
    "Count to three.",
    "What is the capital of France?",
    "Name a colour.",
    "What colour is grass?",
    "Say good morning.",
]
COMPLETIONS = [" It is blue.", " Five.", " Ahoy matey!", " one two three", " Paris.", " red", " green", " Good morning, sir."]


@pytest.fixture
def prompt_completion_dataset():
    return Dataset.from_dict({"prompt": PROMPTS, "completion": COMPLETIONS})


@pytest.fixture
def conversational_dataset():
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p in PROMPTS],
            "completion": [[{"role": "assistant", "content": c.strip()}] for c in COMPLETIONS],
        }
    )


@pytest.fixture
def language_modeling_dataset():
    return Dataset.from_dict({"text": [p + c for p, c in zip(PROMPTS, COMPLETIONS)]})
