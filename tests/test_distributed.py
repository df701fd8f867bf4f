"""Distributed training: two CPU processes (DDP over gloo, launched by ``accelerate launch``) against one process with
the same global batch; DeepSpeed ZeRO-3 parameter registration; the shipped accelerate configs."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from peft.tuners.lora.layer import Linear as LoraLinear
from safetensors.torch import load_file

from tests.helpers import CPU_ARGS, lora_config
from tests.training_script import build_trainer, member_weights
from trl_renyi import RenyiSFTConfig, RenyiSFTTrainer, build_ensemble
from trl_renyi.model.layer import member_names
from trl_renyi.testing import tiny_llama
from trl_renyi.training import mixin as trainer_base

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "training_script.py"
CONFIGS = ROOT / "examples" / "accelerate_configs"
KINDS = ["sft", "dpo"]
# two processes of 2 rows each against one process of 4 rows: the same global batch (gradient checkpointing on, as
# by default, since it interacts with DDP's gradient hooks). Adam's default ε = 1e-8 turns a gradient entry that is
# zero up to rounding into a ±lr step whose sign is the rounding's; a larger ε keeps the update proportional to the
# gradient there, so the weights compare the two processes' reduced gradients, not the sign of float noise.
DISTRIBUTED = {"max_steps": 2, "per_device_train_batch_size": 2, "gradient_checkpointing": True, "adam_epsilon": 1e-4}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """One `accelerate launch` of two processes training every available trainer in turn."""
    out = tmp_path_factory.mktemp("ddp")
    kinds = "sft,dpo"
    result = launch_two_processes(kinds, out)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return out


def launch_two_processes(kind: str, output_dir: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(CONFIGS / "ddp_cpu.yaml"),
        "--main_process_port", str(free_port()),
        str(SCRIPT), "distributed", "--kind", kind, "--output-dir", str(output_dir),
        "--overrides", json.dumps(DISTRIBUTED),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("kind", KINDS)
def test_two_cpu_processes_match_one_process_with_the_same_global_batch(two_process_run, tmp_path, tokenizer, kind):
    out = two_process_run / kind
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    # two processes really ran: distinct ranks and pids, world size 2, gloo
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" for r in reports)
    assert len({r["pid"] for r in reports} | {os.getpid()}) == 3
    assert reports[0]["losses"] == reports[1]["losses"] and len(reports[0]["losses"]) == 2

    single = build_trainer(kind, tmp_path / "single", tokenizer=tokenizer, **{**DISTRIBUTED, "per_device_train_batch_size": 4})
    single.train()
    single_losses = [e["loss"] for e in single.state.log_history if "loss" in e]
    step1_ddp, step1_single = reports[0]["losses"][0], single_losses[0]
    assert abs(step1_ddp - step1_single) <= 1e-4 * abs(step1_single), (step1_ddp, step1_single)

    rank0, rank1 = (load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1))
    reference = member_weights(single)
    assert rank0.keys() == rank1.keys() == reference.keys() and len(rank0) > 0
    assert any(".member_2." in key for key in rank0)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key  # every process ends with identical members
        torch.testing.assert_close(rank0[key], reference[key], rtol=0, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


def test_two_processes_resolve_alpha_auto_identically(tmp_path):
    """alpha='auto' on two DDP processes: measured once (on the main process), the same resolution on both ranks, the
    same α in force after the warm-up, and the same weights."""
    overrides = {**DISTRIBUTED, "max_steps": 4, "alpha": "auto", "alpha_warmup_ratio": 0.5, "auto_alpha_null_draws": 10}
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(CONFIGS / "ddp_cpu.yaml"), "--main_process_port", str(free_port()),
        str(SCRIPT), "distributed", "--kind", "sft", "--output-dir", str(tmp_path), "--overrides", json.dumps(overrides),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    reports = [json.loads((tmp_path / "sft" / f"rank{r}.json").read_text()) for r in (0, 1)]
    first, second = (r["auto_alpha"] for r in reports)
    assert first is not None and first == second and first["step"] == 2
    assert reports[0]["alphas"] == reports[1]["alphas"] and reports[0]["alphas"][2:] == [first["alpha"]] * 2
    rank0, rank1 = (load_file(str(tmp_path / "sft" / f"rank{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)


def _lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def test_zero3_registers_every_member_weight_with_its_layer(tokenizer):
    model = build_ensemble(tiny_llama(tokenizer), lora_config(), num_members=3)
    calls = []
    count = trainer_base.register_members_with_zero3(
        model, member_names(3), register=lambda module, param: calls.append((module, param))
    )
    layers = _lora_layers(model)
    assert len(layers) == 14 and count == len(calls) == 14 * 3 * 2
    expected = {
        (id(layer), id(getattr(layer, part)[name].weight))
        for layer in layers
        for name in member_names(3)
        for part in ("lora_A", "lora_B")
    }
    assert {(id(m), id(p)) for m, p in calls} == expected
    assert all(isinstance(p, torch.nn.Parameter) for _, p in calls)


def test_trainer_registers_members_when_zero3_is_on(tmp_path, tokenizer, make_model, prompt_completion_dataset, monkeypatch):
    calls = []
    real = trainer_base.register_members_with_zero3

    def recording(model, names):
        return real(model, names, register=lambda module, param: calls.append((module, param)))

    monkeypatch.setattr(trainer_base, "register_members_with_zero3", recording)
    monkeypatch.setattr(trainer_base, "is_deepspeed_zero3_enabled", lambda: True)
    args = RenyiSFTConfig(output_dir=str(tmp_path), num_members=2, **CPU_ARGS)
    trainer = RenyiSFTTrainer(
        model=make_model(), args=args, train_dataset=prompt_completion_dataset, processing_class=tokenizer,
        peft_config=lora_config(),
    )
    assert len(calls) == len(_lora_layers(trainer.model)) * 2 * 2 > 0
    assert {id(p) for _, p in calls} == {id(p) for n, p in trainer.model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize(
    "name, distributed_type, extra",
    [
        ("ddp_cpu.yaml", "MULTI_GPU", {"num_processes": 2, "use_cpu": False, "mixed_precision": "no"}),
        ("ddp.yaml", "MULTI_GPU", {}),
        ("deepspeed_zero2.yaml", "DEEPSPEED", {"zero_stage": 2}),
        ("deepspeed_zero3.yaml", "DEEPSPEED", {"zero_stage": 3}),
        ("fsdp.yaml", "FSDP", {"fsdp_version": 2}),
    ],
)
def test_shipped_accelerate_configs_load(name, distributed_type, extra):
    config = load_config_from_file(str(CONFIGS / name))
    assert config.distributed_type.value == distributed_type
    for key, value in extra.items():
        section = {**(config.deepspeed_config or {}), **(config.fsdp_config or {})}
        actual = section[key] if key in section else getattr(config, key)
        assert str(actual) == str(value), (key, actual)
