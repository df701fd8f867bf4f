"""Count the route of one SFT and one DPO training batch through the trainer's own code (docs/architecture.md, "Hops").

    python docs/route.py          # the counts for the installed trl_renyi
    PYTHONPATH=OTHER_CHECKOUT python docs/route.py   # the same counts for another version of the package

One training step of a tiny offline Llama (K = 2, default settings) is run and its first ``compute_loss`` traced with ``sys.setprofile`` from the trainer's
``compute_loss`` down. A *trainer call* is a call from one of the trainer classes' modules (:data:`TRAINER_FILES`)
into another or the same; everything else of the package (the objective, the model, the step records, data helpers)
is a leaf, counted only among all calls into the package. Reported: trainer calls, their deepest nesting, how often a call changes
file (a *switch*: the reader turns to another file), how many go from the shared parts (the mixin, the step scope) back into a
trainer's own file (a *callback*: a hook, or a closure the trainer handed down), and every call into the package.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: the trainer classes' modules: a call between two of them is a hop of the route
TRAINER_FILES = {
    f"trl_renyi/training/{name}.py" for name in ("sft", "dpo", "mixin", "persistence", "checkpoint", "trainer")
}

#: the parts both trainers share: a call from one of these into a trainer's own file is a callback
SHARED_FILES = {f"trl_renyi/training/{name}.py" for name in ("mixin", "persistence", "checkpoint", "step")}
#: each trainer's own file
OWN_FILES = {"trl_renyi/training/sft.py", "trl_renyi/training/dpo.py"}


def _package_file(code) -> str | None:
    parts = Path(code.co_filename).parts
    if "trl_renyi" not in parts:
        return None
    return "/".join(parts[parts.index("trl_renyi") :])


def _is_trainer(path: str | None) -> bool:
    return path in TRAINER_FILES


class RouteTracer:
    """Records the package's calls below the first ``compute_loss`` entered while active."""

    def __init__(self):
        self.stack: list[str | None] = []
        self.inside = 0
        self.calls: list[tuple[str, str, str, int]] = []  # (caller file, callee file, callee name, trainer depth)
        self.trainer_depth = [0]
        self.done = False

    def __call__(self, frame, event, arg):
        if event == "call":
            path = _package_file(frame.f_code)
            name = frame.f_code.co_name
            if self.done:
                return
            if not self.inside and name == "compute_loss" and _is_trainer(path):
                self.inside = 1
                self.stack = [path]
                self.trainer_depth = [0]
                return
            if not self.inside:
                return
            caller = next((p for p in reversed(self.stack) if p is not None), None)
            depth = self.trainer_depth[-1]
            if path is not None and name != "<lambda>" and name.startswith("<"):
                pass  # comprehensions are no calls
            elif path is not None:
                trainer = _is_trainer(path) and name != "<lambda>"  # a lambda is no hop, but can be a callback
                depth = depth + 1 if trainer and _is_trainer(caller) else depth
                self.calls.append((caller, path, name, depth if trainer else -1))
            self.stack.append(path)
            self.trainer_depth.append(depth)
        elif event == "return" and self.inside:
            if len(self.stack) == 1:
                self.inside, self.done = 0, True
                self.stack = []
                return
            self.stack.pop()
            self.trainer_depth.pop()

    def summary(self) -> dict:
        trainer = [c for c in self.calls if c[3] >= 0 and _is_trainer(c[0])]
        return {
            "trainer_calls": len(trainer),
            "deepest": max((c[3] for c in trainer), default=0),
            "switches": sum(caller != callee for caller, callee, _, _ in trainer),
            "callbacks": sum(caller in SHARED_FILES and callee in OWN_FILES for caller, callee, _, _ in self.calls),
            "files": sorted({c[1] for c in trainer}),
            "package_calls": len(self.calls),
            "route": [f"{'  ' * (c[3] - 1)}{c[1].split('/')[-1]}:{c[2]}" for c in trainer],
        }


def one_step(kind: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig

    from trl_renyi import RenyiDPOConfig, RenyiDPOTrainer, RenyiSFTConfig, RenyiSFTTrainer
    from trl_renyi.testing import tiny_llama, tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer)
    common = {
        "output_dir": "/tmp/trl_renyi_route", "num_members": 2, "max_steps": 1, "per_device_train_batch_size": 4,
        "report_to": "none", "bf16": False, "use_cpu": True, "save_strategy": "no", "disable_tqdm": True,
    }  # fmt: skip
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if kind == "sft":
        data = Dataset.from_dict({"prompt": ["What is two plus three?"] * 4, "completion": [" Five.", " 5", " Five.", " 5"]})
        trainer = RenyiSFTTrainer(
            model, args=RenyiSFTConfig(**common), train_dataset=data, processing_class=tokenizer, peft_config=peft_config
        )
    else:
        data = Dataset.from_dict(
            {"prompt": ["What is two plus three?"] * 4, "chosen": [" Five."] * 4, "rejected": [" Six."] * 4}
        )
        trainer = RenyiDPOTrainer(
            model, args=RenyiDPOConfig(**common), train_dataset=data, processing_class=tokenizer, peft_config=peft_config
        )
    tracer = RouteTracer()
    sys.setprofile(tracer)
    try:
        trainer.train()  # one step; the first compute_loss is traced
    finally:
        sys.setprofile(None)
    return tracer.summary()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--route", action="store_true", help="print every trainer call, indented by its nesting")
    parser.add_argument("--json", default=None, help="also write the counts to this file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import trl_renyi

    results = {kind: one_step(kind) for kind in ("sft", "dpo")}
    print(f"trl_renyi at {Path(trl_renyi.__file__).parent}")
    for kind, summary in results.items():
        print(
            f"{kind}: {summary['trainer_calls']} trainer calls, {summary['deepest']} levels deep, {summary['switches']} "
            f"file switches, {summary['callbacks']} callbacks from the shared parts, over {', '.join(summary['files'])}; {summary['package_calls']} calls into the package"
        )
        if args.route:
            print("\n".join("  " + line for line in summary["route"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
