"""Memory of K LoRA members on a 4-bit (bitsandbytes NF4) frozen base against a float32 base, on CPU.

For each base (float32, NF4) and K it reports the model's memory footprint (base weights + all members' LoRA
weights, ``get_memory_footprint``) and the peak RSS increase of one member-batched training step (forward, α-Rényi
bound, backward, AdamW) over the RSS before it. The model is a random-initialised Llama from a config (default: the
SmolLM2-135M architecture; nothing is downloaded). Small by design: one step per setting, a short batch.

    python benchmarks/bench_qlora_memory.py                       # SmolLM2-135M architecture, K = 1, 4
    python benchmarks/bench_qlora_memory.py --quick               # tiny model: a smoke test
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import REPO, PeakMemory, update_benchmarks_page, write_json  # noqa: E402

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)  # fmt: skip
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=320, tie_word_embeddings=False)  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", default="1,4")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="tiny model")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "qlora_memory.json"))
    parser.add_argument("--docs", default=None, help="page to update (default docs/benchmarks.md; quick: none)")
    return parser.parse_args(argv)


def load(folder: str, quantized: bool):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not quantized:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=torch.float32,
                                                device_map={"": "cpu"})  # fmt: skip


def one_step(model, k: int, args) -> None:
    from trl_renyi.model.layer import member_routing
    from trl_renyi.model.members import tile_for_members
    from trl_renyi.objective import renyi_bound

    vocab = model.config.vocab_size
    ids = torch.randint(4, vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    with member_routing(model, rows_per_member=args.batch_size):
        logits = model(input_ids=tile_for_members({"input_ids": ids}, k)["input_ids"]).logits[:, :-1]
        lp = torch.log_softmax(logits.float(), -1).gather(-1, ids.repeat(k, 1)[:, 1:, None]).squeeze(-1)
        loss = -renyi_bound(lp.sum(-1).view(k, -1).T, -1.0).value.mean()
        loss.backward()
    optimizer.step()


def main(argv=None) -> int:
    args = parse_args(argv)
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    from trl_renyi.model.members import build_ensemble

    folder = tempfile.mkdtemp(prefix="qlora_memory_")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**(TINY if args.quick else SMOLLM2))).save_pretrained(folder)
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear", task_type="CAUSAL_LM")
    rows = []
    for quantized in (False, True):
        for k in (int(v) for v in args.members.split(",")):
            model = build_ensemble(load(folder, quantized), lora, k, init_std=1e-3)
            footprint = model.get_memory_footprint() / 2**20
            with PeakMemory(torch.device("cpu")) as memory:
                one_step(model, k, args)
            rows.append({"base": "nf4" if quantized else "float32", "k": k, "footprint_mib": footprint,
                         "step_peak_increase_mib": memory.increase / 2**20})  # fmt: skip
            print(f"{rows[-1]['base']:>7} K={k}: model {footprint:.0f} MiB, step +{rows[-1]['step_peak_increase_mib']:.0f} MiB")
            del model
            gc.collect()
    write_json(args.output, {"settings": vars(args), "results": rows})
    table = ["| base | K | model footprint (MiB) | training step, peak RSS increase (MiB) |", "|---|---|---|---|"]
    table += [f"| {r['base']} | {r['k']} | {r['footprint_mib']:.0f} | {r['step_peak_increase_mib']:.0f} |" for r in rows]
    update_benchmarks_page("qlora-memory", "\n".join(table), args.docs, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
