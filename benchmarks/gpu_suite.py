"""GPU suite: member-batched K-LoRA training steps against a sequential loop of K PEFT adapters and one LoRA.

Built to run in one shot on a machine with one CUDA GPU and only torch, transformers, peft and accelerate (no trl,
datasets or gguf, nothing to download, no real weights): the models are random-initialised from configs,

    smollm2-135m   the SmolLM2-135M(-Instruct) architecture (Llama, 30 layers, hidden 576, vocab 49152)
    llama-1b       a ~1.2B Llama-3.2-1B-style architecture (16 layers, hidden 2048, vocab 128256)

in bfloat16 with sdpa attention and LoRA r = 16 on all linear layers of the decoder. It imports only the
model-level parts of trl_renyi (the member-batched PEFT layer, the shared-prompt layout and the objective), which
need neither TRL nor datasets. Per model and K ∈ {1, 2, 4, 8} it times (median step after warm-up, CUDA-synchronised)
and reports peak GPU memory for

    single       one LoRA adapter: forward, completion log-likelihood, backward, AdamW step (the work of one
                 SFTTrainer step; TRL itself is not installed on the GPU machine)
    sequential   K PEFT adapters, one forward + backward each per step (``set_adapter`` in a loop), one AdamW step
    batched      the K members in one member-batched forward + backward (rows tiled K times, every LoRA layer adds
                 member k's delta to its own rows) with the α-Rényi bound over the members, one AdamW step

    batched_nf4  ``batched`` on the same architecture loaded in 4-bit (bitsandbytes NF4, bfloat16 compute; QLoRA):
                 only when bitsandbytes is importable (``--no-quantized`` skips it); step time and peak memory
                 against ``batched`` on the float base

and, per model at K = 4, a DPO step (reference pass of the base model + member pass, sigmoid loss, Rényi bound)
with the chosen and rejected sequences run separately (``dpo_unshared``) or as one packed row per pair that runs
the prompt once (``dpo_shared``). Before timing it checks the maths on the device: the member-batched per-member
log-likelihoods equal the sequential adapters' (same weights), and the shared DPO loss equals the unshared one.

One JSON file out (``--output``). Target: ``batched`` K = 4 step <= 0.5 x ``sequential`` on llama-1b.

Usage (see benchmarks/gpu_suite.sh, which records the card and runs this under a time limit):

    python benchmarks/gpu_suite.py --output gpu_suite.json
    python benchmarks/gpu_suite.py --dry-run --output /tmp/gpu_suite.json     # tiny config on CPU, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = {
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192,
    ),
    "llama-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True, max_position_embeddings=8192,
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=320, tie_word_embeddings=False, max_position_embeddings=512,
    ),
}  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m,llama-1b", help=f"comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--members", default="1,2,4,8", help="the K values")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per member per step")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per row (the second half is the completion)")
    parser.add_argument("--dpo-prompt", type=int, default=384, help="prompt tokens of a DPO pair")
    parser.add_argument("--dpo-completion", type=int, default=64, help="tokens of each DPO completion")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--alpha", type=float, default=-1.0)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "gpu_suite.json"))
    parser.add_argument("--dry-run", action="store_true", help="tiny model, float32, on CPU: checks that it all runs")
    parser.add_argument("--no-quantized", dest="quantized", action="store_false", help="skip the 4-bit (NF4) base")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.models, args.members, args.batch_size, args.seq_len = "tiny", "1,2", 2, 16
        args.dpo_prompt, args.dpo_completion, args.warmup, args.steps = 12, 4, 1, 1
    return args


# ---------------------------------------------------------------------------------------------------------- models
def build_model(name: str, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**MODELS[name], attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()  # no dropout anywhere; LoRA dropout is 0


def build_quantized_model(name: str, device, dtype, folder: Path):
    """The same random-initialised architecture loaded in 4-bit NF4 by bitsandbytes (saved once to ``folder``, then
    quantised on load as ``from_pretrained(..., quantization_config=...)`` does for QLoRA)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = folder / name
    if not path.exists():
        build_model(name, "cpu", dtype).save_pretrained(str(path))
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    device_map = {"": torch.cuda.current_device()} if device.type == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=config, dtype=dtype, device_map=device_map)
    return model.eval()


def bitsandbytes_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def lora_config(args):
    from peft import LoraConfig

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules=targets,
                      task_type="CAUSAL_LM")  # fmt: skip


def peft_adapters(base, args, count: int):
    """Plain PEFT: ``count`` LoRA adapters on ``base`` (each trained with ``set_adapter`` in turn)."""
    from peft import get_peft_model

    names = [f"member_{k}" for k in range(count)]
    model = get_peft_model(base, lora_config(args), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, lora_config(args))
    model.set_requires_grad(names, requires_grad=True)
    return model, names


def randomise_lora_b(model, seed: int = 1):
    """Non-zero LoRA B (the same values for the same parameter names), so that the members differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_((torch.randn(param.shape, generator=generator) * 0.01).to(param.dtype))


# ------------------------------------------------------------------------------------------------------------ maths
def token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(R, T−1)`` log p(label_t | < t), 0 where the label is -100 (float32)."""
    target = labels[:, 1:]
    flat = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), target.flatten().clamp(min=0), reduction="none"
    )
    return -flat.view(target.shape) * (target != -100)


def member_logliks(lp: torch.Tensor, num_members: int) -> torch.Tensor:
    """``(N, K)`` sequence log-likelihoods from the tiled per-token log-probs ``(K·N, T−1)``."""
    return lp.sum(-1).view(num_members, -1).T


def sft_batch(args, vocab: int, rows: int, device, seed: int):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (rows, args.seq_len), generator=generator)
    labels = ids.clone()
    labels[:, : args.seq_len // 2] = -100
    return ids.to(device), labels.to(device)


def dpo_batch(args, vocab: int, pairs: int, device, seed: int):
    """TRL's preference layout: rows ``[chosen; rejected]`` (2B, P + C) with attention and completion masks."""
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(4, vocab, (pairs, args.dpo_prompt), generator=generator)
    chosen = torch.randint(4, vocab, (pairs, args.dpo_completion), generator=generator)
    rejected = torch.randint(4, vocab, (pairs, args.dpo_completion), generator=generator)
    ids = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)])
    attention = torch.ones_like(ids)
    completion = torch.zeros_like(ids)
    completion[:, args.dpo_prompt :] = 1
    return ids.to(device), attention.to(device), completion.to(device)


# ---------------------------------------------------------------------------------------------------------- timing
class Timer:
    def __init__(self, device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def measure(self, step, warmup: int, steps: int) -> dict:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(warmup + steps):
            self.sync()
            start = time.perf_counter()
            step()
            self.sync()
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else None
        return {"median_step_s": statistics.median(times[warmup:]), "step_times_s": times, "peak_memory_gib": peak}


def optimizer_for(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def sequential_step(model, names, optimizer, ids, labels):
    for name in names:
        model.set_adapter(name)
        lp = token_log_probs(model(input_ids=ids).logits, labels)
        (-lp.sum() / (labels[:, 1:] != -100).sum()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def batched_step(model, optimizer, ids, labels, num_members: int, alpha: float):
    from trl_renyi.model.layer import member_routing
    from trl_renyi.model.members import tile_for_members
    from trl_renyi.objective import floored_renyi_bound

    tiled = tile_for_members({"input_ids": ids, "labels": labels}, num_members)
    with member_routing(model, rows_per_member=ids.shape[0]):
        lp = token_log_probs(model(input_ids=tiled["input_ids"]).logits, tiled["labels"])
        bound = floored_renyi_bound(member_logliks(lp, num_members), alpha, floor=0.1)
        (-bound.value.sum() / (labels[:, 1:] != -100).sum()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def dpo_member_logps(model, batch, num_members: int, shared: bool, base_only: bool, dtype):
    """``(K, 2B)`` summed completion log-probs of the chosen/rejected rows (the base model's, K = 1, when
    ``base_only``), from the rows as given or from one packed row per pair (the prompt once)."""
    from trl_renyi.model.layer import base_model_only, member_routing
    from trl_renyi.model.members import tile_for_members
    from trl_renyi.model.shared_prompt import pack_preference_pairs

    ids, attention, completion = batch
    count = 1 if base_only else num_members
    if shared:
        packed = pack_preference_pairs(ids, attention, completion, pad_token_id=0)
        inputs = packed.model_inputs("sdpa", dtype)
        index = packed.example_index
    else:
        inputs = {"input_ids": ids, "attention_mask": attention, "labels": ids.masked_fill(completion == 0, -100)}
        index = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
    labels = inputs.pop("labels")
    rows = inputs["input_ids"].shape[0]
    with base_model_only(model) if base_only else member_routing(model, rows_per_member=rows):
        logits = model(**tile_for_members(inputs, count)).logits
    lp = token_log_probs(logits, labels.repeat(count, 1)).view(count, rows, -1)
    return lp.new_zeros(count, ids.shape[0]).index_add(1, index[:, 1:].reshape(-1), lp.reshape(count, -1))


def dpo_loss(model, batch, num_members: int, shared: bool, alpha: float, dtype, beta: float = 0.1):
    """The ensemble's DPO loss: −mean_i J_i over the members' Bradley–Terry log-likelihoods log σ(β·Δ_ik)."""
    from trl_renyi.objective import floored_renyi_bound

    with torch.no_grad():
        reference = dpo_member_logps(model, batch, num_members, shared, True, dtype)
    chosen, rejected = (dpo_member_logps(model, batch, num_members, shared, False, dtype) - reference).chunk(2, dim=1)
    loglik = torch.nn.functional.logsigmoid(beta * (chosen - rejected)).T  # (B, K)
    return -floored_renyi_bound(loglik, alpha, floor=0.1).value.mean()


def dpo_step(model, optimizer, batch, num_members, shared, alpha, dtype):
    dpo_loss(model, batch, num_members, shared, alpha, dtype).backward()  # no checkpointing: nothing recomputed
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def copy_lora_weights(source, target) -> None:
    """Give ``target``'s LoRA weights the values of the same-named ones in ``source`` (member k = adapter k)."""
    values = {name: p for name, p in source.named_parameters() if "lora_" in name}
    with torch.no_grad():
        for name, param in target.named_parameters():
            if "lora_" in name:
                param.copy_(values[name])


# ------------------------------------------------------------------------------------------------------------- run
def versions() -> dict:
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}  # fmt: skip


def run(args) -> dict:
    from trl_renyi.model.members import build_ensemble

    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    timer = Timer(device)
    members = [int(k) for k in args.members.split(",")]
    results, checks = [], {}
    payload = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})",
        "versions": versions(),
        "settings": vars(args),
        "results": results,
        "checks": checks,
    }

    def record(model_name, k, mode, figures, tokens):
        row = {"model": model_name, "k": k, "mode": mode, **figures, "tokens_per_s": tokens / figures["median_step_s"]}
        results.append(row)
        memory = "" if row["peak_memory_gib"] is None else f", peak {row['peak_memory_gib']:.1f} GiB"
        print(f"  {model_name} K={k} {mode}: {row['median_step_s'] * 1000:.1f} ms{memory}", flush=True)
        write(args.output, payload)

    for model_name in args.models.split(","):
        print(f"{model_name}: building a random-initialised model ({device}, {dtype}) ...", flush=True)
        vocab = MODELS[model_name]["vocab_size"]
        ids, labels = sft_batch(args, vocab, args.batch_size, device, seed=0)
        tokens = args.batch_size * args.seq_len
        for k in members:
            batched = build_ensemble(build_model(model_name, device, dtype), lora_config(args), k)
            randomise_lora_b(batched)
            sequential, names = peft_adapters(build_model(model_name, device, dtype), args, k)
            copy_lora_weights(batched, sequential)
            # check: one member-batched forward gives each member the log-likelihoods its own adapter gives
            checks[f"{model_name}/K={k}/batched_vs_sequential_max_rel_loglik_diff"] = loglik_difference(
                batched, sequential, names, ids, labels
            )
            optimizer = optimizer_for(batched)
            figures = timer.measure(
                lambda: batched_step(batched, optimizer, ids, labels, k, args.alpha), args.warmup, args.steps
            )
            record(model_name, k, "batched", figures, k * tokens)
            del batched
            optimizer = optimizer_for(sequential)
            figures = timer.measure(
                lambda: sequential_step(sequential, names, optimizer, ids, labels), args.warmup, args.steps
            )
            record(model_name, k, "sequential", figures, k * tokens)
            del sequential, optimizer
            if k == 1:
                single, single_names = peft_adapters(build_model(model_name, device, dtype), args, 1)
                optimizer = optimizer_for(single)
                figures = timer.measure(
                    lambda: sequential_step(single, single_names, optimizer, ids, labels), args.warmup, args.steps
                )
                record(model_name, 1, "single", figures, tokens)
                del single, optimizer
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if args.quantized and bitsandbytes_available():
            import tempfile

            with tempfile.TemporaryDirectory(prefix="gpu_suite_nf4_") as folder:
                for k in members:
                    model = build_ensemble(build_quantized_model(model_name, device, dtype, Path(folder)),
                                           lora_config(args), k)  # fmt: skip
                    randomise_lora_b(model)
                    optimizer = optimizer_for(model)
                    figures = timer.measure(
                        lambda: batched_step(model, optimizer, ids, labels, k, args.alpha), args.warmup, args.steps
                    )
                    record(model_name, k, "batched_nf4", figures, k * tokens)
                    del model, optimizer
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
        k = 4 if 4 in members else members[-1]
        batch = dpo_batch(args, vocab, args.batch_size, device, seed=1)
        model = build_ensemble(build_model(model_name, device, dtype), lora_config(args), k)
        randomise_lora_b(model)
        with torch.no_grad():
            shared = dpo_loss(model, batch, k, True, args.alpha, dtype)
            unshared = dpo_loss(model, batch, k, False, args.alpha, dtype)
        checks[f"{model_name}/K={k}/dpo_shared_vs_unshared_abs_loss_diff"] = float((shared - unshared).abs())
        optimizer = optimizer_for(model)
        pair_tokens = 2 * args.batch_size * (args.dpo_prompt + args.dpo_completion)
        for mode, share in (("dpo_shared", True), ("dpo_unshared", False)):
            record(model_name, k, mode, timer.measure(
                lambda: dpo_step(model, optimizer, batch, k, share, args.alpha, dtype), args.warmup, args.steps
            ), k * pair_tokens)  # fmt: skip
        del model, optimizer
    payload["ratios"] = ratios(results)
    write(args.output, payload)
    for label, value in payload["ratios"].items():
        print(f"  {label}: {value['value']:.3f}" + (f" (target {value['target']})" if value.get("target") else ""))
    return payload


def loglik_difference(batched, sequential, names, ids, labels) -> float:
    from trl_renyi.model.layer import member_routing
    from trl_renyi.model.members import tile_for_members

    k = len(names)
    with torch.no_grad():
        tiled = tile_for_members({"input_ids": ids, "labels": labels}, k)
        with member_routing(batched, rows_per_member=ids.shape[0]):
            together = member_logliks(token_log_probs(batched(input_ids=tiled["input_ids"]).logits, tiled["labels"]), k)
        apart = []
        for name in names:
            sequential.set_adapter(name)
            apart.append(token_log_probs(sequential(input_ids=ids).logits, labels).sum(-1))
    scale = float(torch.stack(apart, 1).abs().max())
    return float((together - torch.stack(apart, 1)).abs().max()) / max(scale, 1.0)


def ratios(results) -> dict:
    def step(model, k, mode):
        return next((r["median_step_s"] for r in results if (r["model"], r["k"], r["mode"]) == (model, k, mode)), None)

    out = {}
    for model in dict.fromkeys(r["model"] for r in results):
        for k in sorted({r["k"] for r in results if r["model"] == model}):
            batched, sequential, single = step(model, k, "batched"), step(model, k, "sequential"), step(model, 1, "single")
            if batched and sequential:
                target = "<= 0.5" if (model, k) == ("llama-1b", 4) else None
                out[f"{model} K={k} batched / sequential"] = {"value": batched / sequential, "target": target}
            if batched and single:
                out[f"{model} K={k} batched / single"] = {"value": batched / single, "target": None}
            nf4 = step(model, k, "batched_nf4")
            if batched and nf4:
                out[f"{model} K={k} batched_nf4 / batched (time)"] = {"value": nf4 / batched, "target": None}
                memory = [next(r["peak_memory_gib"] for r in results if (r["model"], r["k"], r["mode"]) == (model, k, m))
                          for m in ("batched_nf4", "batched")]  # fmt: skip
                if None not in memory:
                    out[f"{model} K={k} batched_nf4 / batched (peak memory)"] = {"value": memory[0] / memory[1], "target": None}
        shared = [r for r in results if r["model"] == model and r["mode"] == "dpo_shared"]
        if shared:
            k = shared[0]["k"]
            out[f"{model} K={k} dpo_shared / dpo_unshared"] = {
                "value": step(model, k, "dpo_shared") / step(model, k, "dpo_unshared"), "target": None,
            }  # fmt: skip
    return out


def write(path, payload) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    with contextlib.suppress(AttributeError):
        torch.backends.cuda.matmul.allow_tf32 = True
    run(args)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
