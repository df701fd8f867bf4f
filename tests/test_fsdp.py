"""FSDP2 for real: two CPU processes (gloo, ``torch.distributed.run``) shard the ensemble's decoder layers with
``fully_shard`` and train member-batched α-Rényi steps with the completion head; loss, every member's LoRA
gradients and the saved members equal the one-process steps.

Accelerate does not turn a CPU run into FSDP (it upgrades only multi-accelerator runs), so the trainer cannot be driven
into FSDP here; the test shards the model itself, as accelerate would on GPUs (docs/reliability.md).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from tests import fsdp_script
from tests.helpers import assert_close_dicts
from trl_renyi.model.layer import member_names, member_routing
from trl_renyi.model.members import attach_ensemble, tile_for_members

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not hasattr(torch.distributed, "is_available") or not torch.distributed.is_available(),
    reason="torch.distributed is not available",
)


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "tests" / "fsdp_script.py"), str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return out


def one_process_steps():
    """The same steps in one process on the whole batch: losses, first-step LoRA gradients, the trained model."""
    torch.manual_seed(0)
    model, tokenizer = fsdp_script.build()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=fsdp_script.LEARNING_RATE)
    full = fsdp_script.batch(tokenizer)
    total = int((full["labels"][:, 1:] != -100).sum())
    losses, grads = [], None
    for _ in range(fsdp_script.STEPS):
        losses.append(float(fsdp_script.loss_of(model, full, total)))
        if grads is None:
            grads = fsdp_script.lora_state(model, grads=True)
        optimizer.step()
        optimizer.zero_grad()
    return losses, grads, model, tokenizer


def test_two_process_fsdp2_steps_equal_one_process(sharded_run):
    report = json.loads((sharded_run / "report.json").read_text())
    assert report["world_size"] == 2 and report["backend"] == "gloo" and report["sharded_lora_params"] > 0
    losses, grads, model, _ = one_process_steps()
    full_numel = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert report["local_lora_numel"] < full_numel  # each rank held only a shard of the members
    assert report["losses"] == pytest.approx(losses, rel=1e-5)
    assert losses[1] != pytest.approx(losses[0], rel=1e-3)  # the first step moved the members
    sharded = load_file(str(sharded_run / "grads.safetensors"))
    assert {n for n in sharded if ".member_1." in n}  # every member's gradients, not only the active adapter's
    assert_close_dicts(sharded, grads, rtol=1e-5, scaled=True)


def test_save_from_the_sharded_run_reloads_as_the_same_ensemble(sharded_run):
    """The members gathered from the shards, saved as PEFT adapters, reload (plain PEFT, then attached) with exactly
    the sharded run's weights and outputs; those weights are the one-process run's up to float rounding."""
    _, _, trained, tokenizer = one_process_steps()
    names = member_names(fsdp_script.NUM_MEMBERS)
    final = load_file(str(sharded_run / "final.safetensors"))
    gathered, _ = fsdp_script.build()
    gathered.load_state_dict(final, strict=False)
    base, _ = fsdp_script.build()
    base = base.unload()  # the same base model, without adapters
    folder = sharded_run / "members"
    reloaded = PeftModel.from_pretrained(base, str(folder / names[0]), adapter_name=names[0])
    for name in names[1:]:
        reloaded.load_adapter(str(folder / name), adapter_name=name)
    attach_ensemble(reloaded, fsdp_script.NUM_MEMBERS)
    assert_close_dicts(fsdp_script.lora_state(reloaded), fsdp_script.lora_state(gathered), rtol=0, atol=0)
    assert_close_dicts(fsdp_script.lora_state(gathered), fsdp_script.lora_state(trained), rtol=1e-4, scaled=True)
    inputs = fsdp_script.batch(tokenizer)
    inputs.pop("labels")
    rows = inputs["input_ids"].shape[0]
    with torch.no_grad():
        outputs = []
        for model in (reloaded, gathered):
            with member_routing(model, rows_per_member=rows):
                outputs.append(model(**tile_for_members(inputs, len(names))).logits)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
