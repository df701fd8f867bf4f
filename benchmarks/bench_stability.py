"""Time and memory of the stability criterion (``trl_renyi.stability``) on the embedded model.

Two workloads of ``--units`` units each, on SmolLM2-135M-Instruct with one LoRA (r 8, all-linear), gradients sketched
to D = 4096, 20 null draws:

* ``choice``: per-vote units from HS-Brexit (``../shared/data/group-conflicts/hs-brexit.jsonl``; skipped when absent):
  every (tweet, option) sequence once, the exact Fisher;
* ``free text``: prompt/completion rows of the bundled conflict generator (``trl_renyi.data``), each scored with its
  observed completion and 2 + 2 completions sampled along its prefix (Fisher and null).

Memory is the peak resident memory of the process above its level once the model is loaded.

    python benchmarks/bench_stability.py                 # 2,000 units per workload, updates docs/benchmarks.md
    python benchmarks/bench_stability.py --quick         # 64 units, no page update
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import REPO, PeakMemory, machine_description, update_benchmarks_page, write_json  # noqa: E402

HS_BREXIT = REPO.parent / "shared" / "data" / "group-conflicts" / "hs-brexit.jsonl"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--units", type=int, default=2000)
    parser.add_argument("--sketch_dim", type=int, default=4096)
    parser.add_argument("--null_draws", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="64 units per workload, no page update")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "stability.json"))
    parser.add_argument("--docs", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.units = min(args.units, 64)
    return args


def workloads(tokenizer, units: int) -> dict:
    from trl_renyi.data.conflict import conflict_sft_dataset
    from trl_renyi.data.group_conflicts import group_choice_rows, read_group_items
    from trl_renyi.stability import SequenceVotes, choice_votes
    from trl_renyi.stability.votes import subsample_units

    out = {}
    if HS_BREXIT.is_file():  # every vote its own unit
        votes = choice_votes(group_choice_rows(read_group_items(HS_BREXIT)), tokenizer, unit="completion")
        out["choice"] = subsample_units(votes, units, seed=0)
    rows = conflict_sft_dataset(num_train_per_family=units // 4 + 1, seed=0)["train"]
    ids, labels = [], []
    for row in rows.select(range(min(units, len(rows)))):
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids.append(prompt + completion)
        labels.append([-100] * len(prompt) + completion)
    out["free text"] = SequenceVotes(ids, labels, [1.0] * len(ids), list(range(len(ids))), list(range(len(ids))))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from peft import LoraConfig

    from trl_renyi.model.loading import load_causal_lm, load_tokenizer
    from trl_renyi.model.members import build_ensemble
    from trl_renyi.stability import measure_stability

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    model = build_ensemble(load_causal_lm("smollm2-135m-instruct", dtype="float32"), config, 1, seed=0, init_std=1e-3)
    rows = []
    for name, votes in workloads(tokenizer, args.units).items():
        with PeakMemory(torch.device("cpu")) as memory:
            report = measure_stability(
                model, tokenizer, votes, adapter="member_0", sketch_dim=args.sketch_dim, null_draws=args.null_draws
            )
        rows.append({
            "workload": name, "units": report.num_units, "votes": report.num_votes, "parameters": report.num_parameters,
            "sketch_dim": report.sketch_dim, "seconds": round(report.seconds, 1),
            "memory_mib": round(memory.increase / 2**20), "lambda1": report.lambda1,
        })  # fmt: skip
        print(f"{name}: {rows[-1]}", flush=True)
    payload = {"machine": machine_description(torch.device("cpu")), "rows": rows, "config": vars(args)}
    write_json(args.output, payload)
    lines = [
        "| workload | units | votes | adapter parameters P | sketch D | seconds | peak memory above the model (MiB) |",
        "|---|---|---|---|---|---|---|",
    ] + [
        f"| {r['workload']} | {r['units']} | {r['votes']} | {r['parameters']:,} | {r['sketch_dim']} | {r['seconds']:.0f} | {r['memory_mib']} |"
        for r in rows
    ]  # fmt: skip
    update_benchmarks_page("bench-stability", "\n".join(lines), args.docs, args.quick)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
