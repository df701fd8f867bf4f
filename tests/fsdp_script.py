"""Worker of tests/test_fsdp.py: member-batched α-Rényi steps of an ensemble sharded with FSDP2 (``fully_shard``).

Launched as two CPU processes by ``python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_script.py OUT``
(gloo). Every rank builds the same K = 2 ensemble on a tiny Llama, shards each decoder layer and then the whole
PeftModel with ``fully_shard``, and trains on its half of a global batch of 4 rows with the completion head and the
α-Rényi bound; the loss of each rank is normalised by the *global* completion-token count times the world size, so
FSDP's gradient average is the one-process gradient. Rank 0 writes the step losses, the first step's full LoRA
gradients and the members after the last step (gathered into a full state dict, written as it is and saved as PEFT
adapters).

:func:`build`, :func:`batch` and :func:`loss_of` are imported by the test for the one-process reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NUM_MEMBERS, ALPHA, LEARNING_RATE, STEPS = 2, -1.0, 0.5, 2
TEXTS = [
    "What colour is the sky? It is blue.",
    "Say hello. Ahoy matey!",
    "What is two plus three? Five.",
    "Name a colour. Green.",
]


def build():
    """The K-member ensemble (random LoRA B, so that members differ) with the completion head."""
    from tests.helpers import lora_config
    from trl_renyi.model.lm_head import add_completion_lm_head
    from trl_renyi.model.members import build_ensemble
    from trl_renyi.testing import tiny_llama, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = build_ensemble(tiny_llama(tokenizer, seed=0, init_std=0.5), lora_config(), NUM_MEMBERS, init_std=0.1)
    assert add_completion_lm_head(model.get_base_model())
    return model, tokenizer


def batch(tokenizer):
    """The global batch: every token but padding scored."""
    inputs = dict(tokenizer(TEXTS, return_tensors="pt", padding=True))
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return inputs


def loss_of(model, rows: dict, total_tokens: int, scale: float = 1.0) -> torch.Tensor:
    """−Σ_i J_i(α) over ``rows`` divided by ``total_tokens`` (the global completion-token count), times ``scale``."""
    from trl_renyi.model.layer import member_routing
    from trl_renyi.model.members import tile_for_members
    from trl_renyi.objective import renyi_bound

    count = rows["input_ids"].shape[0]
    with member_routing(model, rows_per_member=count):
        tiled = tile_for_members(rows, NUM_MEMBERS)
        out = model(**tiled, completion_head=True, num_members=NUM_MEMBERS)
        loglik = out.log_probs.sum(-1).view(NUM_MEMBERS, count).t()  # ℓ_ik, (B, K)
        loss = -renyi_bound(loglik, ALPHA).value.sum() / total_tokens * scale
        loss.backward()
    return loss.detach()


def lora_state(model, grads: bool = False) -> dict[str, torch.Tensor]:
    out = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            value = param.grad if grads else param
            if hasattr(value, "full_tensor"):
                value = value.full_tensor()
            out[name] = value.detach().clone().contiguous()
    return out


def main(output: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model, tokenizer = build()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.get_base_model().model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = [n for n, p in model.named_parameters() if "lora_" in n and isinstance(p, DTensor)]
    assert sharded and all(isinstance(p, DTensor) for n, p in model.named_parameters() if "lora_" in n)
    local_rows = sum(p.to_local().numel() for n, p in model.named_parameters() if "lora_" in n)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    full = batch(tokenizer)
    total_tokens = int((full["labels"][:, 1:] != -100).sum())
    per_rank = full["input_ids"].shape[0] // world
    mine = {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in full.items()}
    losses, first_grads = [], None
    for _ in range(STEPS):
        loss = loss_of(model, mine, total_tokens, scale=world)  # FSDP averages the gradients over the world
        summed = loss.clone()
        dist.all_reduce(summed)
        losses.append(float(summed) / world)
        if first_grads is None:
            first_grads = lora_state(model, grads=True)
        optimizer.step()
        optimizer.zero_grad()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        save_file(first_grads, str(out / "grads.safetensors"))
        save_file({k: v.contiguous() for k, v in state.items() if "lora_" in k}, str(out / "final.safetensors"))
        plain, _ = build()  # an unsharded ensemble holding the sharded run's weights, saved as PEFT adapters
        plain.load_state_dict({k: v for k, v in state.items() if "lora_" in k}, strict=False)
        plain.save_pretrained(str(out / "members"))
        report = {"losses": losses, "world_size": world, "backend": dist.get_backend(), "local_lora_numel": local_rows,
                  "sharded_lora_params": len(sharded)}  # fmt: skip
        (out / "report.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
