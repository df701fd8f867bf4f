"""The README's Python snippets run as written, on a tiny local model instead of the embedded one.

Only three things are substituted (each substitution is asserted to apply, so a README edit that drops one shows up
here): the model name, the number of steps and the number of members. Everything else — datasets, configs, saving,
loading, scoring — is the README's own text.
"""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_the_sft_and_dpo_snippets():
    snippets = python_snippets()
    assert any("RenyiSFTTrainer(" in s for s in snippets) and any("RenyiDPOTrainer(" in s for s in snippets)
    assert all("max_steps=" in s for s in snippets if "Trainer(" in s), "a README run must be bounded on CPU"
    assert all("gradient_checkpointing=False" in s for s in snippets if "Trainer(" in s), "as docs/installation.md advises on CPU"


@pytest.mark.parametrize("which", ["RenyiSFTTrainer(", "RenyiDPOTrainer("])
def test_readme_snippet_runs_as_written(which, make_model, tokenizer, tmp_path, monkeypatch):
    (snippet,) = [s for s in python_snippets() if which in s]
    model_dir = tmp_path / "tiny-llama"
    make_model().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    substitutions = {
        '"smollm2-135m-instruct"': repr(str(model_dir)),
        "max_steps=60": "max_steps=2",
        "num_members=4": "num_members=2",
    }
    for old, new in substitutions.items():
        assert old in snippet, f"the README snippet no longer contains {old!r}"
        snippet = snippet.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, f"README.md ({which.rstrip('(')} snippet)", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 2
    output = "renyi-sft" if which.startswith("RenyiSFT") else "renyi-dpo"
    files = {p.relative_to(tmp_path / output).as_posix() for p in (tmp_path / output).rglob("*") if p.is_file()}
    assert {"member_0/adapter_config.json", "member_1/adapter_model.safetensors", "renyi_ensemble.json", "README.md"} <= files
    if "scores" in namespace:
        scores = namespace["scores"]
        assert scores.member_loglik.shape == (1, 2) and bool(scores.member_loglik.isfinite().all())
