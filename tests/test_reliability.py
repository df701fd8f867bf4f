"""Reliability: interrupted runs and resuming, atomic checkpoints, bad input, numerics, safe loading."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from tests.helpers import (
    CPU_ARGS,
    PLAIN_OBJECTIVE,
    first_batch,
    lora_config,
    lora_grads,
)
from tests.training_script import build_trainer, dataset, member_weights
from trl_renyi import (
    RenyiDPOConfig,
    RenyiEnsemble,
    RenyiSFTConfig,
    RenyiSFTTrainer,
    build_ensemble,
)
from trl_renyi.model import saved_format
from trl_renyi.model.layer import member_names
from trl_renyi.testing import tiny_llama
from trl_renyi.training.checkpoint import STAGING_PREFIX

SCRIPT = Path(__file__).with_name("training_script.py")
KINDS = ["sft", "dpo"]


def assert_same_weights(actual, expected, atol=1e-5):
    assert actual.keys() == expected.keys() and len(actual) > 0
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=atol, msg=lambda m, key=key: f"{key}: {m}")


def checkpoint_is_complete(folder: Path, num_members: int) -> bool:
    files = ["trainer_state.json", "renyi_ensemble.json", "optimizer.pt", "scheduler.pt"]
    files += [f"{name}/adapter_model.safetensors" for name in member_names(num_members)]
    return all((folder / f).is_file() for f in files)


class _Snapshot(TrainerCallback):
    """LoRA weights at the end of every optimizer step."""

    def __init__(self):
        self.weights = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


# ---------------------------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tokenizer):
    """Final member weights of the scripted run (6 steps) that nothing interrupts, per trainer kind."""
    cache = {}

    def weights(kind):
        if kind not in cache:
            trainer = build_trainer(kind, tmp_path_factory.mktemp(f"reference-{kind}"), tokenizer=tokenizer)
            trainer.train()
            cache[kind] = member_weights(trainer)
        return cache[kind]

    return weights


@pytest.mark.parametrize("kind", KINDS)
def test_sigterm_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, tokenizer, uninterrupted, kind):
    """A run killed with SIGTERM during step 3 of 6 (4 steps per epoch, checkpoint every 2 steps) resumes from
    checkpoint-2 and ends with the member weights of a run that was never interrupted."""
    killed = tmp_path / "killed"
    killed.mkdir()
    command = [sys.executable, str(SCRIPT), "pause", "--kind", kind, "--output-dir", str(killed)]
    command += ["--pause-after-step", "3", "--save-steps", "2"]
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while not (killed / "paused").exists():
                assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the scripted run never reached step 3"
                time.sleep(0.2)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == -signal.SIGTERM
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert sorted(p.name for p in killed.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    assert checkpoint_is_complete(killed / "checkpoint-2", num_members=3)
    assert json.loads((killed / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2

    resumed = build_trainer(kind, killed, tokenizer=tokenizer)
    steps = _Snapshot()
    resumed.add_callback(steps)
    resumed.train(resume_from_checkpoint=True)
    assert sorted(steps.weights) == [3, 4, 5, 6]  # it went on from step 2, the killed step 3 was redone
    assert_same_weights(member_weights(resumed), uninterrupted(kind))


def test_interrupted_checkpoint_save_is_never_published(tmp_path, tokenizer, uninterrupted, monkeypatch):
    """A save that dies after the first member of checkpoint-4 leaves no ``checkpoint-4``: the newest checkpoint
    is still the complete checkpoint-2, and resuming from it reproduces the uninterrupted run."""
    import peft.peft_model

    real_save = peft.peft_model.safe_save_file
    calls = []

    def failing_save(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 5:  # checkpoint-2 wrote 3 members; die after the 1st member of checkpoint-4
            raise OSError("No space left on device (simulated)")
        return real_save(tensors, filename, *args, **kwargs)

    out = tmp_path / "run"
    settings = {"save_strategy": "steps", "save_steps": 2}
    crashed = build_trainer("sft", out, tokenizer=tokenizer, **settings)
    monkeypatch.setattr(peft.peft_model, "safe_save_file", failing_save)
    with pytest.raises(OSError, match="simulated"):
        crashed.train()
    monkeypatch.setattr(peft.peft_model, "safe_save_file", real_save)
    assert len(calls) == 5 and "member_0" in calls[-2]
    assert not (out / "checkpoint-4").exists()
    assert (out / f"{STAGING_PREFIX}checkpoint-4").is_dir()  # the partial save, under a name nothing looks up
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2")
    assert checkpoint_is_complete(out / "checkpoint-2", num_members=3)

    resumed = build_trainer("sft", out, tokenizer=tokenizer, **settings)
    resumed.train(resume_from_checkpoint=True)
    assert_same_weights(member_weights(resumed), uninterrupted("sft"))
    # the stale partial save is cleaned up; checkpoints 4 and 6 are published complete, holding the live weights
    assert not any(p.name.startswith(STAGING_PREFIX) for p in out.iterdir())
    assert checkpoint_is_complete(out / "checkpoint-4", num_members=3)
    assert checkpoint_is_complete(out / "checkpoint-6", num_members=3)
    saved = load_file(str(out / "checkpoint-6" / "member_2" / "adapter_model.safetensors"))
    live = {k.replace(".member_2", ""): v for k, v in member_weights(resumed).items() if ".member_2." in k}
    assert live.keys() == saved.keys()
    for key, value in saved.items():
        torch.testing.assert_close(value, live[key], rtol=0, atol=0)


def _one_step_checkpoint(tmp_path, tokenizer, num_members=2):
    trainer = build_trainer(
        "sft", tmp_path / "run", tokenizer=tokenizer, num_members=num_members, max_steps=1, save_strategy="steps",
        save_steps=1,
    )
    trainer.train()
    return tmp_path / "run" / "checkpoint-1"


def test_resume_refuses_pickle_weights_and_other_num_members(tmp_path, tokenizer):
    checkpoint = _one_step_checkpoint(tmp_path, tokenizer)
    wrong_k = build_trainer("sft", tmp_path / "k3", tokenizer=tokenizer, num_members=3, max_steps=2)
    with pytest.raises(ValueError, match=r"renyi_ensemble\.json records num_members=2 .* num_members=3"):
        wrong_k.train(resume_from_checkpoint=str(checkpoint))

    weights = checkpoint / "member_1" / "adapter_model.safetensors"
    torch.save(load_file(str(weights)), checkpoint / "member_1" / "adapter_model.bin")
    weights.unlink()
    resumed = build_trainer("sft", tmp_path / "k2", tokenizer=tokenizer, num_members=2, max_steps=2)
    with pytest.raises(ValueError, match=r"member_1/adapter_model\.bin is a pickle file"):
        resumed.train(resume_from_checkpoint=str(checkpoint))


# ---------------------------------------------------------------------------------------------- bad input


LONG_PROMPT = "What is the capital of France? " * 6


def _truncation_dataset(kind, num_long):
    """The scripted dataset with the first ``num_long`` prompts replaced by one longer than ``max_length=24``."""
    from datasets import Dataset

    columns = dataset(kind).to_dict()
    columns["prompt"] = [LONG_PROMPT if i < num_long else p for i, p in enumerate(columns["prompt"])]
    return Dataset.from_dict(columns)


@pytest.mark.parametrize("kind", KINDS)
def test_examples_emptied_by_truncation_are_counted_and_excluded(tmp_path, tokenizer, kind):
    assert len(tokenizer(LONG_PROMPT)["input_ids"]) > 24
    with pytest.warns(UserWarning, match=r"2 of 8 examples of the train dataset have no completion token left .* "
                      r"max_length=24"):
        trainer = build_trainer(
            kind, tmp_path, tokenizer=tokenizer, train_dataset=_truncation_dataset(kind, 2), num_members=2,
            max_length=24, max_steps=1, per_device_train_batch_size=8,
        )
    assert len(trainer.train_dataset) == 6
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 1 and math.isfinite(losses[0])


@pytest.mark.parametrize("kind", KINDS)
def test_all_examples_emptied_by_truncation_is_an_error(tmp_path, tokenizer, kind):
    with pytest.raises(ValueError, match=r"All 8 examples of the train dataset .* max_length=24"):
        build_trainer(kind, tmp_path, tokenizer=tokenizer, train_dataset=_truncation_dataset(kind, 8), max_length=24)


def test_rows_without_completion_tokens_never_give_nan(tmp_path, tokenizer, make_model):
    """A row whose labels are all -100 contributes nothing (not a NaN); a batch of only such rows has loss 0."""
    args = RenyiSFTConfig(
        output_dir=str(tmp_path), num_members=3, member_init_std=0.05, per_device_train_batch_size=4, **CPU_ARGS
    )
    trainer = RenyiSFTTrainer(
        model=make_model(), args=args, train_dataset=dataset("sft"), processing_class=tokenizer,
        peft_config=lora_config(),
    )
    model = trainer.model
    model.train()
    batch = first_batch(trainer)
    rest = {k: v[1:] for k, v in batch.items()}
    emptied = {k: v.clone() for k, v in batch.items()}
    emptied["labels"][0] = -100
    loss_rest = trainer.compute_loss(model, dict(rest))
    loss_emptied = trainer.compute_loss(model, dict(emptied))
    torch.testing.assert_close(loss_emptied, loss_rest, rtol=1e-5, atol=0)

    nothing = {k: v.clone() for k, v in batch.items()}
    nothing["labels"][:] = -100
    loss = trainer.compute_loss(model, dict(nothing))
    assert torch.isfinite(loss) and float(loss.detach()) == 0.0
    loss.backward()
    grads = [g for name in member_names(3) for g in lora_grads(model, name).values()]
    assert all(torch.isfinite(g).all() and not g.any() for g in grads)


@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_loglik_stops_before_the_update(tmp_path, tokenizer, kind):
    """NaN in member_1's hidden states at step 2: training stops naming step 2 and member_1, weights untouched.

    With 2 rows per batch the member-batched pass has 3·2 (SFT) or 3·4 (DPO: chosen and rejected) rows, while the
    DPO reference pass (4 rows, not a multiple of 3) is left alone."""
    trainer = build_trainer(kind, tmp_path, tokenizer=tokenizer, per_device_train_batch_size=2, max_steps=3)
    snapshot = _Snapshot()
    trainer.add_callback(snapshot)

    def poison_member_1(module, inputs, output):
        if trainer.state.global_step != 1 or output.shape[0] % 3:
            return output
        rows = output.shape[0] // 3
        output = output.clone()
        output[rows : 2 * rows] = float("nan")
        return output

    trainer.model.get_base_model().model.norm.register_forward_hook(poison_member_1)
    assert trainer.num_members == 3
    with pytest.raises(FloatingPointError, match=r"step 2 for member member_1 \("):
        trainer.train()
    assert trainer.state.global_step == 1 and list(snapshot.weights) == [1]
    after = {n: p.detach() for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert after.keys() == snapshot.weights[1].keys()
    for name, value in after.items():
        assert torch.isfinite(value).all(), name
        assert torch.equal(value, snapshot.weights[1][name]), name


@pytest.mark.parametrize("config_cls", [RenyiSFTConfig, RenyiDPOConfig])
@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"num_members": 0}, r"num_members must be an integer >= 1, got 0"),
        ({"num_members": -2}, r"num_members must be an integer >= 1, got -2"),
        ({"num_members": 2.0}, r"num_members must be an integer >= 1, got 2\.0"),
        ({"alpha": float("nan")}, r"alpha must be a finite float or .auto., got nan"),
        ({"alpha": float("inf")}, r"alpha must be a finite float or .auto., got inf"),
        ({"alpha": float("-inf")}, r"alpha must be a finite float or .auto., got -inf"),
        ({"alpha": "low"}, r"alpha must be a finite float or .auto., got 'low'"),
        ({"num_members": 2, "member_weights": [1.0, 2.0, 3.0]}, r"member_weights must have num_members=2 entries, got 3"),
        ({"num_members": 2, "member_weights": [1.0, -1.0]}, r"member_weights must be finite and positive"),
        ({"num_members": 2, "member_weights": [1.0, 0.0]}, r"member_weights must be finite and positive"),
        ({"num_members": 2, "member_weights": [1.0, float("nan")]}, r"member_weights must be finite and positive"),
    ],
)
def test_invalid_ensemble_fields_raise_naming_the_field(tmp_path, config_cls, overrides, match):
    with pytest.raises(ValueError, match=match):
        config_cls(output_dir=str(tmp_path), **{**CPU_ARGS, **overrides})


# ---------------------------------------------------------------------------------------------- saved ensembles

BASE_NAME = "org/tiny-base"


def _named_base(tokenizer, name=BASE_NAME, **kwargs):
    model = tiny_llama(tokenizer, init_std=0.5, **kwargs)
    model.config._name_or_path = name
    return model


@pytest.fixture(scope="module")
def saved_ensemble(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("ensemble") / "saved"
    peft_model = build_ensemble(_named_base(tokenizer), lora_config(), num_members=2, seed=0, init_std=0.05)
    RenyiEnsemble(peft_model, tokenizer, alpha=0.5).save_pretrained(folder)
    return folder


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _to_pickle(member):
    torch.save(load_file(str(member / "adapter_model.safetensors")), member / "adapter_model.bin")
    (member / "adapter_model.safetensors").unlink()


CORRUPTIONS = {
    "missing member folder": (
        lambda d: shutil.rmtree(d / "member_1"), FileNotFoundError, r"Member folder .*/member_1 listed in .*renyi_ensemble\.json is missing"
    ),
    "missing member weights": (
        lambda d: (d / "member_0" / "adapter_model.safetensors").unlink(), FileNotFoundError,
        r"member_0/adapter_model\.safetensors is missing",
    ),
    "pickle member weights": (lambda d: _to_pickle(d / "member_1"), ValueError, r"member_1/adapter_model\.bin is a pickle file"),
    "missing metadata": (lambda d: (d / "renyi_ensemble.json").unlink(), FileNotFoundError, r"renyi_ensemble\.json not found"),
    "corrupted metadata": (
        lambda d: (d / "renyi_ensemble.json").write_text('{"num_members": 2, "alpha": '), ValueError,
        r"renyi_ensemble\.json is not valid JSON",
    ),
    "metadata without alpha": (
        lambda d: (d / "renyi_ensemble.json").write_text(json.dumps(
            {k: v for k, v in json.loads((d / "renyi_ensemble.json").read_text()).items() if k != "alpha"})),
        ValueError, r"renyi_ensemble\.json lacks the field 'alpha'",
    ),
    "metadata alpha infinite": (
        lambda d: _edit_json(d / "renyi_ensemble.json", alpha=float("inf")), ValueError,
        r"renyi_ensemble\.json: alpha must be a finite float, got inf",
    ),
    "metadata lists more members": (
        lambda d: _edit_json(d / "renyi_ensemble.json", num_members=3, member_names=member_names(3),
                             member_weights=[1 / 3] * 3),
        FileNotFoundError, r"member_2 listed in .*renyi_ensemble\.json is missing",
    ),
    "metadata lists fewer members": (
        lambda d: _edit_json(d / "renyi_ensemble.json", num_members=1, member_names=member_names(1), member_weights=[1.0]),
        ValueError, r"holds member folders \['member_1'\] that .*renyi_ensemble\.json does not list",
    ),
    "metadata names mismatch": (
        lambda d: _edit_json(d / "renyi_ensemble.json", member_names=["member_0", "expert_1"]), ValueError,
        r"renyi_ensemble\.json: member_names .* do not match num_members=2",
    ),
    "metadata weights wrong length": (
        lambda d: _edit_json(d / "renyi_ensemble.json", member_weights=[1.0]), ValueError,
        r"renyi_ensemble\.json: member_weights must have num_members=2 entries, got 1",
    ),
    "metadata weights negative": (
        lambda d: _edit_json(d / "renyi_ensemble.json", member_weights=[1.5, -0.5]), ValueError,
        r"renyi_ensemble\.json: member_weights must be finite and positive",
    ),
    "members disagree on r": (
        lambda d: _edit_json(d / "member_1" / "adapter_config.json", r=8), ValueError,
        r"LoRA configs disagree on \['r'\]: .*member_1/adapter_config\.json has r=8 but .*member_0/adapter_config\.json has r=4",
    ),
    "members disagree on target_modules": (
        lambda d: _edit_json(d / "member_1" / "adapter_config.json", target_modules=["q_proj"]), ValueError,
        r"disagree on \['target_modules'\]",
    ),
    "corrupted adapter config": (
        lambda d: (d / "member_1" / "adapter_config.json").write_text("r: 4"), ValueError,
        r"member_1/adapter_config\.json is not valid JSON",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_damaged_saved_ensemble_is_refused_naming_the_file(saved_ensemble, tmp_path, tokenizer, case):
    corrupt, error, match = CORRUPTIONS[case]
    folder = tmp_path / "copy"
    shutil.copytree(saved_ensemble, folder)
    RenyiEnsemble.from_pretrained(folder, base_model=_named_base(tokenizer))  # intact copy loads
    corrupt(folder)
    with pytest.raises(error, match=match):
        RenyiEnsemble.from_pretrained(folder, base_model=_named_base(tokenizer))


@pytest.mark.parametrize(
    "base_kwargs, match",
    [
        (
            {"name": "org/other-base"},
            r"base model 'org/other-base' differs from .*renyi_ensemble\.json \('org/tiny-base'\): base_model_name_or_path",
        ),
        ({"hidden_size": 32}, r"differs from the one recorded in .*renyi_ensemble\.json .*base_model_config_hash"),
        ({"num_layers": 3}, r"base_model_config_hash"),
    ],
)
def test_other_base_model_is_refused(saved_ensemble, tokenizer, base_kwargs, match):
    with pytest.raises(ValueError, match=match):
        RenyiEnsemble.from_pretrained(saved_ensemble, base_model=_named_base(tokenizer, **base_kwargs))
    # the check can be waived deliberately (same model under another name)
    if "name" in base_kwargs:
        ensemble = RenyiEnsemble.from_pretrained(
            saved_ensemble, base_model=_named_base(tokenizer, **base_kwargs), check_base_model=False
        )
        assert ensemble.num_members == 2


def test_local_copy_of_the_recorded_base_is_accepted(saved_ensemble, tokenizer):
    ensemble = RenyiEnsemble.from_pretrained(saved_ensemble, base_model=_named_base(tokenizer, "/models/tiny-base"))
    assert ensemble.num_members == 2


# ---------------------------------------------------------------------------------------------- safe loading


@pytest.fixture
def recorded_loads(monkeypatch, tokenizer):
    import trl_renyi.inference.ensemble as ensemble_module

    calls = {"model": [], "tokenizer": []}

    def fake_model(name, **kwargs):
        calls["model"].append((name, kwargs))
        return _named_base(tokenizer, name)

    def fake_tokenizer(name, **kwargs):
        calls["tokenizer"].append((name, kwargs))
        return tokenizer

    monkeypatch.setattr(ensemble_module, "load_causal_lm", fake_model)
    monkeypatch.setattr(ensemble_module, "load_tokenizer", fake_tokenizer)
    return calls


def test_trust_remote_code_is_off_unless_asked(saved_ensemble, recorded_loads):
    RenyiEnsemble.from_pretrained(saved_ensemble)
    (name, kwargs), = recorded_loads["model"]
    assert name == BASE_NAME and kwargs["trust_remote_code"] is False and "revision" not in kwargs
    assert all(kw["trust_remote_code"] is False for _, kw in recorded_loads["tokenizer"])
    RenyiEnsemble.from_pretrained(saved_ensemble, trust_remote_code=True)
    assert recorded_loads["model"][-1][1]["trust_remote_code"] is True


def test_hub_revisions_are_pinned(saved_ensemble, recorded_loads, monkeypatch):
    downloads = []

    def fake_snapshot_download(repo_id, revision=None, **kwargs):
        downloads.append((repo_id, revision))
        return str(saved_ensemble)

    monkeypatch.setattr(saved_format, "snapshot_download", fake_snapshot_download)
    ensemble = RenyiEnsemble.from_pretrained("org/tiny-ensemble", revision="3f2a9c1", base_model_revision="v1.0")
    assert downloads == [("org/tiny-ensemble", "3f2a9c1")]
    assert recorded_loads["model"][-1][1]["revision"] == "v1.0"
    assert ensemble.num_members == 2


def test_members_load_from_safetensors_even_next_to_a_pickle(saved_ensemble, tmp_path, tokenizer, monkeypatch):
    """A stray pickle next to the safetensors file is never opened."""
    folder = tmp_path / "copy"
    shutil.copytree(saved_ensemble, folder)
    for name in member_names(2):
        (folder / name / "adapter_model.bin").write_bytes(b"not a pickle: opening this file would fail")
    real_load = torch.load

    def no_torch_load(path, *args, **kwargs):
        assert not str(path).endswith("adapter_model.bin"), f"pickle file {path} was opened"
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", no_torch_load)
    ensemble = RenyiEnsemble.from_pretrained(folder, base_model=_named_base(tokenizer))
    expected = load_file(str(saved_ensemble / "member_1" / "adapter_model.safetensors"))
    live = {k.replace(".member_1", ""): v for k, v in ensemble.model.state_dict().items() if ".member_1." in k}
    assert live.keys() == expected.keys() and len(live) > 0
    for key, value in expected.items():
        torch.testing.assert_close(live[key], value, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- numerics


class _Recorder:
    """Wraps ``trainer.renyi_objective`` to keep the ℓ matrix and the bound of every call."""

    def __init__(self, trainer):
        self.calls, self._inner = [], trainer.renyi_objective
        trainer.renyi_objective = self

    def __call__(self, loglik, *args, **kwargs):
        bound = self._inner(loglik, *args, **kwargs)
        self.calls.append((loglik.detach().clone(), bound))
        return bound


def _trainer_for(model, tokenizer, tmp_path, num_members, alpha, **overrides):
    settings = {**CPU_ARGS, **PLAIN_OBJECTIVE, "member_init_std": 0.05, "per_device_train_batch_size": 4, **overrides}
    args = RenyiSFTConfig(output_dir=str(tmp_path), num_members=num_members, alpha=alpha, **settings)
    return RenyiSFTTrainer(
        model=model, args=args, train_dataset=dataset("sft"), processing_class=tokenizer, peft_config=lora_config()
    )


@pytest.mark.parametrize("alpha", [0.5, -1.0])
def test_bfloat16_model_gives_float32_responsibilities(tmp_path, tokenizer, alpha):
    """The same ensemble on a bfloat16 and a float32 base: ℓ agree within bf16 tolerance, the responsibilities
    differ by no more than that ℓ difference implies, and the routing itself is evaluated in float32."""
    fp32 = _trainer_for(tiny_llama(tokenizer, init_std=0.1), tokenizer, tmp_path / "fp32", 4, alpha, member_init_std=0.2)
    bf16 = _trainer_for(
        tiny_llama(tokenizer, init_std=0.1, dtype=torch.bfloat16), tokenizer, tmp_path / "bf16", 4, alpha,
        member_init_std=0.2,
    )
    assert next(bf16.model.get_base_model().parameters()).dtype == torch.bfloat16
    with torch.no_grad():  # identical member weights on both
        lora = {n: p for n, p in fp32.model.named_parameters() if "lora_" in n}
        for n, p in bf16.model.named_parameters():
            if "lora_" in n:
                p.copy_(lora[n].to(p.dtype))
    records = []
    for trainer in (fp32, bf16):
        recorder = _Recorder(trainer)
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, first_batch(trainer))
        assert torch.isfinite(loss)
        records.append(recorder.calls[-1])
    (ll32, b32), (ll16, b16) = records
    assert b16.responsibilities.dtype == torch.float32 and b16.value.dtype == torch.float32
    # routing in float32 on the bf16 model's ℓ: exactly softmax(log π + (1−α)ℓ) computed in float64
    expected = torch.softmax((1 - alpha) * ll16.double(), dim=-1)
    torch.testing.assert_close(b16.responsibilities.double(), expected, rtol=0, atol=1e-6)
    # ℓ of the bf16 model within torch's bfloat16 tolerance (rtol 1.6e-2)
    torch.testing.assert_close(ll16.float(), ll32, rtol=1.6e-2, atol=1e-5)
    # members differ, so the routing is not trivially uniform
    assert float((b32.responsibilities.max(-1).values - b32.responsibilities.min(-1).values).mean()) > 0.1
    # since ∂r_k/∂z_j = r_k(δ_kj − r_j), |Δr_k| ≤ ¼·range_j(Δz_j) with z = (1−α)ℓ: the routing adds no error of its own
    delta = (ll16.float() - ll32) * abs(1 - alpha)
    row_bound = (delta.max(-1).values - delta.min(-1).values) / 4 + 1e-6
    assert ((b16.responsibilities - b32.responsibilities).abs().max(-1).values <= row_bound).all()
    torch.testing.assert_close(b16.responsibilities, b32.responsibilities, rtol=0, atol=5e-2)


@pytest.mark.parametrize("alpha", [-1.0, 3.0])
def test_very_low_loglik_and_sixteen_members_stay_finite(tmp_path, tokenizer, alpha):
    """K = 16 members and ℓ beyond −10⁴ (an LM head scaled up 200×): loss, gradients, responsibilities and the
    updated weights stay finite, and the responsibilities are exact."""
    model = tiny_llama(tokenizer, init_std=0.5)
    with torch.no_grad():
        model.lm_head.weight.mul_(200.0)
    trainer = _trainer_for(
        model, tokenizer, tmp_path, 16, alpha, max_steps=1, learning_rate=1e-3, gradient_checkpointing=False,
        per_device_train_batch_size=2,
    )
    recorder = _Recorder(trainer)
    trainer.train()
    loglik, bound = recorder.calls[0]
    assert loglik.shape[1] == 16 and float(loglik.min()) < -1e4
    assert torch.isfinite(loglik).all() and torch.isfinite(bound.value).all()
    expected = torch.softmax((1 - alpha) * loglik.double(), dim=-1)
    torch.testing.assert_close(bound.responsibilities.double(), expected, rtol=0, atol=1e-6)
    loss = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(loss) == 1 and math.isfinite(loss[0])
    assert all(torch.isfinite(p).all() for n, p in trainer.model.named_parameters() if "lora_" in n)
