"""Publishing: the model card, the exact files uploaded by both push_to_hub methods (network mocked), and loading
a repo-shaped folder (also through a mocked Hub download)."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import HfApi
from peft import PeftModel

from tests.helpers import CPU_ARGS, lora_config
from trl_renyi import RenyiEnsemble, RenyiSFTConfig, RenyiSFTTrainer, build_ensemble
from trl_renyi.hub import model_card
from trl_renyi.model import saved_format

PROMPTS = ["What colour is the sky?", "Say hello."]
COMPLETIONS = [" It is blue.", " Ahoy matey!"]


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def base_metadata(**extra):
    meta = {
        "num_members": 3,
        "member_names": ["member_0", "member_1", "member_2"],
        "alpha": -1.0,
        "member_weights": [0.5, 0.25, 0.25],
        "alpha_warmup_ratio": 0.5,
        "loglik_reduction": "sum",
        "member_init_std": 0.01,
        "base_model_name_or_path": "smollm2-135m-instruct",
        "trainer": "RenyiSFTTrainer",
        "library_version": "0.1.0",
    }
    meta.update(extra)
    return meta


def test_model_card_metadata_and_content():
    meta = base_metadata(
        routing_share=[0.6, 0.3, 0.1],
        eval_results={"greetings": {"choice MI": 0.61}, "arithmetic": {"choice MI": 0.02}},
    )
    text = str(model_card(meta, repo_id="someone/renyi-demo", dataset_name="trl_renyi:conflict_sft_chat"))
    data = front_matter(text)
    # the embedded alias is published under the original model's Hub id
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data["library_name"] == "trl_renyi" and data["pipeline_tag"] == "text-generation"
    assert "datasets" not in data  # the bundled generator is no Hub dataset
    assert front_matter(str(model_card(meta, dataset_name="trl-lib/Capybara")))["datasets"] == ["trl-lib/Capybara"]
    assert {"trl", "trl-renyi", "peft", "lora", "sft"} <= set(data["tags"])
    assert "| members K | 3 |" in text
    assert "| α | -1 (held at 1 for the first 50% of the steps) |" in text
    assert "| `member_0` | 0.500 | 0.600 |" in text and "| `member_2` | 0.250 | 0.100 |" in text
    assert "## Evaluation" in text and "| greetings | 0.61 |" in text and "| arithmetic | 0.02 |" in text
    assert 'RenyiEnsemble.from_pretrained("someone/renyi-demo")' in text
    assert 'subfolder="member_0"' in text


def test_model_card_without_routing_or_eval_and_with_a_local_base(tmp_path):
    meta = base_metadata(base_model_name_or_path=str(tmp_path), trainer="RenyiDPOTrainer")
    text = str(model_card(meta, tags=["custom"]))
    data = front_matter(text)
    assert "base_model" not in data  # a local folder is no Hub model
    assert "dpo" in data["tags"] and "custom" in data["tags"]
    assert "| `member_1` | 0.250 | n/a |" in text and "## Evaluation" not in text


@pytest.fixture
def capture_upload(monkeypatch):
    """Replace the Hub calls by recorders; the uploaded folder is copied before the temporary one disappears."""
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, repo_id, **kwargs):
        calls["create_branch"] = (repo_id, kwargs)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls.setdefault("uploads", []).append(repo_id)
        target = Path(calls["_dir"]) / ("uploaded" if len(calls["uploads"]) == 1 else f"uploaded{len(calls['uploads'])}")
        ignore = shutil.ignore_patterns(*(kwargs.get("ignore_patterns") or []))
        shutil.copytree(folder_path, target, ignore=ignore)
        calls["upload_folder"] = (repo_id, kwargs)
        return SimpleNamespace(commit_url="https://example.invalid/commit", done=lambda: True, cancel=lambda: None)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the recorders stand in for the Hub
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def uploaded_files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def member_files(k):
    return {f"member_{i}/{name}" for i in range(k) for name in ("adapter_config.json", "adapter_model.safetensors")}


def test_ensemble_push_to_hub_uploads_members_metadata_card_and_tokenizer(
    make_model, tokenizer, capture_upload, tmp_path
):
    capture_upload["_dir"] = tmp_path
    model = build_ensemble(make_model(), lora_config(), num_members=2, seed=0, init_std=0.05)
    ensemble = RenyiEnsemble(
        model,
        tokenizer,
        alpha=0.0,
        metadata={"eval_results": {"accuracy": 0.75}, "routing_share": [0.4, 0.6]},
        use_chat_template=False,  # the plain-PEFT check below tokenises the strings as plain text
    )
    ensemble.push_to_hub("someone/tiny-renyi", private=True, revision="v1")

    assert capture_upload["create_repo"][0] == "someone/tiny-renyi"
    assert capture_upload["create_repo"][1]["private"] is True
    assert capture_upload["create_branch"][1]["branch"] == "v1"
    assert capture_upload["upload_folder"][1]["revision"] == "v1"
    folder = tmp_path / "uploaded"
    files = uploaded_files(folder)
    assert member_files(2) | {"README.md", "renyi_ensemble.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".tmp")) for f in files)
    meta = json.loads((folder / "renyi_ensemble.json").read_text())
    assert meta["num_members"] == 2 and meta["alpha"] == 0.0
    card = (folder / "README.md").read_text()
    assert front_matter(card)["library_name"] == "trl_renyi"
    assert 'from_pretrained("someone/tiny-renyi")' in card
    assert "| accuracy | 0.75 |" in card and "| `member_1` | 0.500 | 0.600 |" in card

    # the uploaded folder is a loadable repository: the ensemble reproduces the original scores ...
    reloaded = RenyiEnsemble.from_pretrained(str(folder), base_model=make_model(), use_chat_template=False)
    expected = ensemble.score(PROMPTS, COMPLETIONS).member_loglik
    torch.testing.assert_close(reloaded.score(PROMPTS, COMPLETIONS).member_loglik, expected, rtol=1e-5, atol=1e-5)
    # ... and each member loads as a plain PEFT adapter from its subfolder, as the card says
    plain = PeftModel.from_pretrained(make_model(), str(folder), subfolder="member_1")
    enc = tokenizer(PROMPTS[1] + COMPLETIONS[1] + tokenizer.eos_token, return_tensors="pt")
    start = len(tokenizer(PROMPTS[1])["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(plain(**enc).logits[0, :-1], -1)
    targets = enc["input_ids"][0, 1:]
    member_1 = logp.gather(-1, targets[:, None]).squeeze(-1)[start - 1 :].sum()
    torch.testing.assert_close(member_1, expected[1, 1], rtol=1e-5, atol=1e-5)


def test_from_pretrained_with_a_repo_id_downloads_the_revision(make_model, tokenizer, monkeypatch, tmp_path):
    model = build_ensemble(make_model(), lora_config(), num_members=2, seed=0, init_std=0.05)
    RenyiEnsemble(model, tokenizer, alpha=0.5).save_pretrained(tmp_path / "repo")
    requested = {}

    def snapshot_download(repo_id, revision=None, **kwargs):
        requested.update(repo_id=repo_id, revision=revision)
        return str(tmp_path / "repo")

    monkeypatch.setattr(saved_format, "snapshot_download", snapshot_download)
    loaded = RenyiEnsemble.from_pretrained("someone/tiny-renyi", revision="abc123", base_model=make_model())
    assert requested == {"repo_id": "someone/tiny-renyi", "revision": "abc123"}
    assert loaded.num_members == 2 and loaded.alpha == 0.5


def test_trainer_save_and_push_to_hub_write_the_ensemble_card(
    make_model, tokenizer, prompt_completion_dataset, capture_upload, tmp_path
):
    capture_upload["_dir"] = tmp_path
    output_dir = tmp_path / "run"
    args = RenyiSFTConfig(
        output_dir=str(output_dir),
        num_members=2,
        alpha=0.0,
        member_init_std=0.05,
        max_steps=2,
        per_device_train_batch_size=4,
        hub_model_id="someone/renyi-sft",
        **CPU_ARGS,
    )
    trainer = RenyiSFTTrainer(
        model=make_model(), args=args, train_dataset=prompt_completion_dataset, processing_class=tokenizer,
        peft_config=lora_config(),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    saved_card = (tmp_path / "saved" / "README.md").read_text()
    assert "## Members" in saved_card and "| members K | 2 |" in saved_card  # the ensemble card, not PEFT's

    trainer.push_to_hub(dataset_name="toy-data")
    assert capture_upload["upload_folder"][0] == "someone/renyi-sft"
    folder = tmp_path / "uploaded"
    assert member_files(2) | {"README.md", "renyi_ensemble.json"} <= uploaded_files(folder)
    card = (folder / "README.md").read_text()
    meta = json.loads((folder / "renyi_ensemble.json").read_text())
    # routing shares in the card are those logged by the trainer once the α warm-up (default: half the steps) ended
    logged = [e for e in trainer.state.log_history if "renyi/member_0/share" in e and e["renyi/alpha"] == 0.0]
    assert len(logged) == 1
    expected = [sum(e[f"renyi/member_{k}/share"] for e in logged) / len(logged) for k in range(2)]
    assert meta["routing_share"] == pytest.approx(expected)
    assert f"| `member_0` | 0.500 | {expected[0]:.3f} |" in card
    assert 'from_pretrained("someone/renyi-sft")' in card and "| training data | toy-data |" in card
    assert "sft" in front_matter(card)["tags"]


def test_trainer_push_to_hub_offline_saves_first_and_says_why(make_model, tokenizer, prompt_completion_dataset, tmp_path):
    """The README's DPO snippet offline: push_to_hub without a save_model first leaves the ensemble on disk and
    says in one line that the Hub is switched off (no raw OfflineModeIsEnabled)."""
    output_dir = tmp_path / "run"
    args = RenyiSFTConfig(output_dir=str(output_dir), num_members=2, max_steps=1, per_device_train_batch_size=4, **CPU_ARGS)
    trainer = RenyiSFTTrainer(
        model=make_model(), args=args, train_dataset=prompt_completion_dataset, processing_class=tokenizer,
        peft_config=lora_config(),
    )
    trainer.train()
    with pytest.raises(RuntimeError, match=r"push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set\. The ensemble is saved in"):
        trainer.push_to_hub()
    assert member_files(2) | {"renyi_ensemble.json", "README.md"} <= uploaded_files(output_dir)
    RenyiEnsemble.from_pretrained(output_dir, base_model=make_model(), tokenizer=tokenizer)


def test_pushes_during_training_carry_every_member(
    make_model, tokenizer, prompt_completion_dataset, capture_upload, tmp_path
):
    """With push_to_hub=True transformers uploads output_dir at every save; the members must be in it."""
    capture_upload["_dir"] = tmp_path
    args = RenyiSFTConfig(
        output_dir=str(tmp_path / "run"),
        num_members=2,
        member_init_std=0.05,
        max_steps=1,
        per_device_train_batch_size=4,
        push_to_hub=True,
        hub_model_id="someone/renyi-live",
        **{**CPU_ARGS, "save_strategy": "steps"},
        save_steps=1,
    )
    trainer = RenyiSFTTrainer(
        model=make_model(), args=args, train_dataset=prompt_completion_dataset, processing_class=tokenizer,
        peft_config=lora_config(),
    )
    trainer.train()
    assert capture_upload["uploads"] == ["someone/renyi-live"]  # the push of checkpoint-1
    files = uploaded_files(tmp_path / "uploaded")
    assert member_files(2) | {"renyi_ensemble.json", "README.md"} <= files
    assert not any(f.startswith("checkpoint-") for f in files)


def test_ensemble_push_to_hub_offline_names_no_temporary_folder(make_model, tokenizer, tmp_path, monkeypatch):
    """Offline, RenyiEnsemble.push_to_hub refuses before anything is written, naming the repository only."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    ensemble = RenyiEnsemble(build_ensemble(make_model(), lora_config(), num_members=2, seed=0), tokenizer)
    with pytest.raises(RuntimeError) as error:
        ensemble.push_to_hub("someone/tiny-renyi")
    message = str(error.value)
    assert message.startswith("Pushing the ensemble to someone/tiny-renyi needs the Hugging Face Hub, but HF_HUB_OFFLINE")
    assert str(tmp_path) not in message and "/tmp" not in message and list(tmp_path.iterdir()) == []
