r"""The demo: train a small α-Rényi ensemble on conflicting data and show where its members disagree.

:func:`run_demo` generates SFT data from :mod:`trl_renyi.data` (two task families answered under two incompatible
conventions, two consistent ones), trains a K-member LoRA ensemble with :class:`~trl_renyi.RenyiSFTTrainer` (α held
at 1 during a warm-up so every member first learns what the data agrees on, then a small α so members specialise on
the contradictions) and, on held-out prompts, reports per family:

* the routing table: the mean responsibility :math:`r_{ik} = \operatorname{softmax}_k(\log\pi_k + (1-\alpha)\ell_{ik})`
  of each member for the answers the training data gives (per convention on contradictory families);
* choice-level mutual information over the two reference answers :math:`c \in \{a, b\}` (both conventions, or the
  correct answer and a distractor): with :math:`p_k(c) = \operatorname{softmax}_c \ell_k(c)`,
  :math:`\mathrm{MI} = H[\sum_k \pi_k p_k] - \sum_k \pi_k H[p_k]` (0 when members agree, up to log 2);
* the maximum over answer tokens of the per-token mutual information, and the spread (std over members) of
  :math:`\ell_k` of the reference answers;
* each member's greedy answer and the mixture's, each with its epistemic uncertainty (max per-token MI).

It writes the ensemble (members, ``renyi_ensemble.json``, model card), a routing heatmap and an uncertainty plot.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from trl_renyi.data import (
    DEFAULT_SYSTEM_PROMPT,
    FAMILIES,
    Item,
    chat_answer,
    chat_prompt,
    conflict_sft_dataset,
)
from trl_renyi.data import held_out_items as make_held_out_items
from trl_renyi.model.loading import DEFAULT_MODEL

DATASET_NAME = "trl_renyi:conflict_sft_chat"
# two contradictory families and two consistent ones the base model already knows: a family it cannot learn from
# the data (e.g. two-digit arithmetic for a 135M model) also shows member disagreement, from ignorance, not conflict
DEMO_FAMILIES = ("greetings", "farewells", "opposites", "capitals")
SIGNALS = {
    "choice_mi": "choice MI",
    "token_mi_max": "max token MI",
    "loglik_std": "ℓ spread (std)",
}


@dataclass
class DemoConfig:
    """Settings of ``trl-renyi demo`` (the defaults are the recipe for the embedded SmolLM2-135M-Instruct)."""

    model_name_or_path: str = field(
        default=DEFAULT_MODEL, metadata={"help": "Base model: the embedded alias, a local folder or a Hub id."}
    )
    output_dir: str = field(
        default="outputs/demo", metadata={"help": "Where the ensemble, the plots and the model card are written."}
    )
    num_members: int = field(default=4, metadata={"help": "Ensemble size K."})
    alpha: float = field(default=-1.0, metadata={"help": "Rényi order α after the warm-up (α < 1 lets members specialise)."})
    alpha_warmup_ratio: float = field(
        default=0.5, metadata={"help": "Fraction of the steps with α held at 1 (members first fit what the data agrees on)."}
    )
    responsibility_floor: float = field(
        default=0.1,
        metadata={"help": "λ of the α = 1 bound mixed into the objective, so no member abandons the agreed families."},
    )
    member_init_std: float = field(default=0.01, metadata={"help": "Std of each member's random initial LoRA B."})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate of the LoRA weights."})
    max_steps: int = field(default=36, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=8, metadata={"help": "Examples per step (every member sees all of them)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of every member (all linear layers)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator."})
    families: list[str] = field(
        default_factory=lambda: list(DEMO_FAMILIES),
        metadata={"help": f"Task families of the generated data, from {sorted(FAMILIES)}."},
    )
    num_test_per_family: int = field(default=8, metadata={"help": "Held-out prompts per family for the evaluation."})
    show_per_family: int = field(default=2, metadata={"help": "Held-out prompts per family whose answers are printed."})
    max_new_tokens: int = field(default=12, metadata={"help": "Length limit of the generated answers."})
    system_prompt: str = field(
        default=DEFAULT_SYSTEM_PROMPT,
        metadata={"help": "Short system message (without one, SmolLM2's template inserts a long default prompt)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the data, the members' initialisation and training."})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)."})

    def __post_init__(self):
        for name in ("num_members", "max_steps", "batch_size", "lora_r", "num_test_per_family"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if self.show_per_family < 0:
            raise ValueError(f"show_per_family must be >= 0, got {self.show_per_family!r}.")
        if not self.families:
            raise ValueError("families must name at least one task family.")
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"families: unknown task families {unknown}; choose from {sorted(FAMILIES)}.")


@dataclass
class FamilyReport:
    """Held-out figures of one task family (means over its prompts)."""

    family: str
    contradictory: bool
    choice_mi: float
    token_mi_max: float
    loglik_std: float
    mixture_accuracy: float | None  # consistent families: how often the mixture prefers the correct answer


@dataclass
class DemoResult:
    """What :func:`run_demo` measured and wrote."""

    routing: dict[str, list[float]]  # "family/convention" -> mean responsibility of each member
    families: list[FamilyReport]
    answers: list[dict]
    gap: dict[str, tuple[float, float]]  # signal -> (contradictory mean, consistent mean)
    ensemble_dir: Path
    plots: list[Path]
    model_card: Path
    train_seconds: float
    wall_seconds: float
    cpu_seconds: float  # CPU time of the process, all threads (on a busy machine a steadier figure than wall time)
    log_history: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- evaluation
def evaluate_families(ensemble, items: dict[str, list[Item]], system_prompt: str | None):
    """Choice-level and token-level uncertainty of every held-out item, and the routing of its reference answers.

    The two reference answers of each item are scored once by :meth:`RenyiEnsemble.score`; the choice-level figures
    (MI, mixture probabilities, responsibilities) come from :func:`trl_renyi.choices.prediction_from_member_log_probs`,
    the max per-token MI and the ℓ spread from the answers the training data gives (both conventions, or the correct
    answer).

    Returns ``(routing, reports, per_item)``: the routing table (``"family/convention"`` → mean responsibilities over
    those answers), a :class:`FamilyReport` per family and per-item details.
    """
    from trl_renyi.inference.choices import prediction_from_member_log_probs

    index = [(family, item) for family, family_items in items.items() for item in family_items]
    prompts = [chat_prompt(item.prompt, system_prompt) for _, item in index]
    scores = ensemble.score(
        [p for p in prompts for _ in range(2)],
        [chat_answer(choice) for _, item in index for choice in item.choices],
        batch_size=16,
    )
    loglik = scores.member_loglik.view(len(index), 2, -1)  # (N, 2 choices, K)
    predictions = [
        prediction_from_member_log_probs(torch.log_softmax(block.T.double(), -1), ensemble.log_weights, block, ensemble.alpha)
        for block in loglik
    ]
    token_mi_max = scores.mutual_information_max.view(len(index), 2)

    routing: dict[str, list[torch.Tensor]] = {}
    per_item, grouped = [], {}
    for row, ((family, item), prediction) in enumerate(zip(index, predictions, strict=True)):
        spec = FAMILIES[family]
        refs = range(len(item.answers))  # the answers the training data gives for this prompt
        for ref in refs:
            routing.setdefault(f"{family}/{spec.conventions[ref]}", []).append(prediction.responsibilities[ref].float())
        spread = prediction.member_loglik.float().std(dim=-1, unbiased=False)  # (C,) std of ℓ_k over members
        details = {
            "family": family,
            "prompt": item.prompt,
            "choices": list(item.choices),
            "choice_mi": float(prediction.mutual_information),
            "mixture_probs": prediction.probs.tolist(),
            "member_choice": prediction.member_probs.argmax(-1).tolist(),  # preferred choice of each member
            "token_mi_max": float(sum(token_mi_max[row, r] for r in refs) / len(refs)),
            "loglik_std": float(sum(spread[r] for r in refs) / len(refs)),
        }
        per_item.append(details)
        grouped.setdefault(family, []).append(details)

    reports = []
    for family, rows in grouped.items():
        spec = FAMILIES[family]
        mean = lambda key: sum(r[key] for r in rows) / len(rows)
        accuracy = None if spec.contradictory else sum(r["mixture_probs"][0] > 0.5 for r in rows) / len(rows)
        reports.append(
            FamilyReport(family, spec.contradictory, mean("choice_mi"), mean("token_mi_max"), mean("loglik_std"), accuracy)
        )
    routing_table = {key: torch.stack(values).mean(0).tolist() for key, values in routing.items()}
    return routing_table, reports, per_item


def uncertainty_gap(reports: Sequence[FamilyReport]) -> dict[str, tuple[float, float]]:
    """``signal -> (mean over contradictory families, mean over consistent families)``."""
    gap = {}
    for key in SIGNALS:
        contra = [getattr(r, key) for r in reports if r.contradictory]
        consistent = [getattr(r, key) for r in reports if not r.contradictory]
        gap[key] = (
            sum(contra) / len(contra) if contra else math.nan,
            sum(consistent) / len(consistent) if consistent else math.nan,
        )
    return gap


# ---------------------------------------------------------------------------------------------------- generation
def generate_answers(ensemble, conversations: list[list[dict]], max_new_tokens: int) -> dict[str, list]:
    """Greedy answers of every member (``strategy="member"``) and of the posterior-weighted mixture
    (``strategy="mixture"``), as :class:`~trl_renyi.generation.GeneratedText` with per-token uncertainty."""
    answers = {
        name: ensemble.generate(conversations, strategy="member", member=name, max_new_tokens=max_new_tokens)
        for name in ensemble.member_names
    }
    answers["mixture"] = ensemble.generate(conversations, strategy="mixture", max_new_tokens=max_new_tokens)
    return answers


# ---------------------------------------------------------------------------------------------------- output
def plot_routing(routing: dict[str, list[float]], member_names: list[str], path: Path) -> Path:
    """Heatmap of the routing table (rows: family/convention, columns: members)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(routing)
    values = torch.tensor([routing[r] for r in rows]).numpy()
    fig, ax = plt.subplots(figsize=(1.3 * len(member_names) + 3, 0.5 * len(rows) + 1.5))
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(member_names)), member_names)
    ax.set_yticks(range(len(rows)), rows)
    for i in range(len(rows)):
        for j in range(len(member_names)):
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", color="w" if values[i, j] < 0.6 else "k")
    fig.colorbar(image, ax=ax, label="mean responsibility")
    ax.set_title("Routing of held-out reference answers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_uncertainty(reports: Sequence[FamilyReport], path: Path) -> Path:
    """Bars of the three epistemic signals per family, contradictory families in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SIGNALS), figsize=(4 * len(SIGNALS), 3.2))
    names = [r.family for r in reports]
    colours = ["tab:red" if r.contradictory else "tab:blue" for r in reports]
    for ax, (key, label) in zip(axes, SIGNALS.items(), strict=True):
        ax.bar(names, [getattr(r, key) for r in reports], color=colours)
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle("Epistemic uncertainty on held-out prompts (red: contradictory training data)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_routing_table(routing: dict[str, list[float]], member_names: list[str], alpha: float) -> str:
    width = max(len(r) for r in routing) + 2
    lines = [f"Routing table: mean responsibility r_ik (α = {alpha:g}) of the held-out reference answers"]
    lines.append("family/convention".ljust(width) + "".join(n.rjust(10) for n in member_names))
    for row, shares in routing.items():
        lines.append(row.ljust(width) + "".join(f"{s:10.2f}" for s in shares))
    return "\n".join(lines)


def format_family_table(reports: Sequence[FamilyReport]) -> str:
    lines = ["Epistemic uncertainty per family (held-out prompts, means)"]
    lines.append(f"{'family':<12}{'data':<15}" + "".join(f"{label:>16}" for label in SIGNALS.values()) + f"{'mixture acc.':>14}")
    for r in reports:
        kind = "contradictory" if r.contradictory else "consistent"
        acc = "-" if r.mixture_accuracy is None else f"{r.mixture_accuracy:.2f}"
        lines.append(
            f"{r.family:<12}{kind:<15}" + "".join(f"{getattr(r, key):16.3f}" for key in SIGNALS) + f"{acc:>14}"
        )
    return "\n".join(lines)


def format_gap(gap: dict[str, tuple[float, float]]) -> str:
    lines = ["Uncertainty gap, contradictory vs consistent families:"]
    for key, (contra, consistent) in gap.items():
        ratio = contra / consistent if consistent > 0 else math.inf
        lines.append(f"  {SIGNALS[key]:<16} {contra:7.3f} vs {consistent:7.3f}   (x{ratio:.1f})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- pipeline
def _quiet_progress(trainer) -> None:
    """Keep the training progress bar but show the loss on it instead of printing every log dictionary."""
    from transformers.trainer_callback import ProgressCallback

    class LossOnBar(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is not None and logs and "loss" in logs:
                alpha = logs.get("renyi/alpha")
                postfix = {"loss": f"{logs['loss']:.3f}"}
                if alpha is not None:
                    postfix["α"] = f"{alpha:g}"
                self.training_bar.set_postfix(postfix)

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossOnBar())


def run_demo(
    config: DemoConfig | None = None,
    model=None,
    tokenizer=None,
    print_fn: Callable[[str], None] = print,
    **overrides,
) -> DemoResult:
    """Train the demo ensemble and report its routing and uncertainty per task family.

    Args:
        config: the settings (``DemoConfig()`` by default); ``overrides`` replace single fields.
        model: a loaded base model (by default ``config.model_name_or_path`` is loaded).
        tokenizer: its tokenizer (required with ``model``; loaded with the model otherwise).
        print_fn: where the report goes.
    """
    from peft import LoraConfig

    from trl_renyi.hub import write_model_card
    from trl_renyi.model.loading import load_causal_lm, load_tokenizer
    from trl_renyi.model.saved_format import read_metadata, write_metadata
    from trl_renyi.training.config import RenyiSFTConfig
    from trl_renyi.training.sft import RenyiSFTTrainer

    start, cpu_start = time.perf_counter(), time.process_time()
    config = DemoConfig(**{**asdict(config or DemoConfig()), **overrides})
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if model is None:
        print_fn(f"Loading {config.model_name_or_path} ...")
        model = load_causal_lm(config.model_name_or_path)
        tokenizer = tokenizer or load_tokenizer(config.model_name_or_path)
    elif tokenizer is None:
        raise ValueError("Pass the tokenizer together with a loaded model.")

    per_family = math.ceil(config.max_steps * config.batch_size / len(config.families))
    data = conflict_sft_dataset(
        num_train_per_family=per_family,
        num_test_per_family=config.num_test_per_family,
        families=config.families,
        seed=config.seed,
        conversational=True,
        system_prompt=config.system_prompt,
    )
    contradictory = [f for f in config.families if FAMILIES[f].contradictory]
    consistent = [f for f in config.families if not FAMILIES[f].contradictory]
    print_fn(
        f"Data: {len(data['train'])} chat examples; contradictory families {contradictory} (two conventions, half each), "
        f"consistent families {consistent}."
    )
    args = RenyiSFTConfig(
        output_dir=str(out_dir / "trainer"),
        num_members=config.num_members,
        alpha=config.alpha,
        alpha_warmup_ratio=config.alpha_warmup_ratio,
        responsibility_floor=config.responsibility_floor,
        member_init_std=config.member_init_std,
        learning_rate=config.learning_rate,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_length=128,
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=config.seed,
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    trainer = RenyiSFTTrainer(
        model=model, args=args, train_dataset=data["train"], processing_class=tokenizer, peft_config=peft_config
    )
    _quiet_progress(trainer)
    warmup_steps = math.ceil(config.alpha_warmup_ratio * config.max_steps)
    print_fn(
        f"Training K = {config.num_members} LoRA members (r = {config.lora_r}, all linear layers) for {config.max_steps} "
        f"steps of {config.batch_size}: α = 1 for {warmup_steps} warm-up steps, then α = {config.alpha:g} with a "
        f"responsibility floor λ = {config.responsibility_floor:g}."
    )
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start

    ensemble = trainer.ensemble
    items = make_held_out_items(config.num_test_per_family, config.families, config.seed)
    routing, reports, per_item = evaluate_families(ensemble, items, config.system_prompt)
    gap = uncertainty_gap(reports)

    shown = [d for family in config.families for d in [p for p in per_item if p["family"] == family][: config.show_per_family]]
    conversations = [chat_prompt(d["prompt"], config.system_prompt) for d in shown]
    answers: list[dict] = []
    if shown:
        generated = generate_answers(ensemble, conversations, config.max_new_tokens)
        pairs = [(source, i, output) for source, outputs in generated.items() for i, output in enumerate(outputs)]
        # each answer's spread of log-likelihood across members: high when some members would never give it
        answer_scores = ensemble.score(
            [conversations[i] for _, i, _ in pairs],
            [chat_answer(output.text.strip() or " ") for _, _, output in pairs],
            batch_size=16,
        )
        for j, (source, i, output) in enumerate(pairs):
            mi = output.mutual_information
            answers.append(
                {
                    "family": shown[i]["family"],
                    "prompt": shown[i]["prompt"],
                    "source": source,
                    "answer": output.text.strip(),
                    "loglik_std": float(answer_scores.loglik_std[j]),
                    "token_mi_max": float(mi.max()) if mi.numel() else 0.0,
                    "member_posterior": [round(float(w), 4) for w in output.member_posterior],
                }
            )

    ensemble_dir = out_dir / "ensemble"
    trainer.save_model(str(ensemble_dir))
    metadata = read_metadata(ensemble_dir)
    metadata["dataset_name"] = DATASET_NAME
    metadata["eval_results"] = {
        f"{r.family} ({'contradictory' if r.contradictory else 'consistent'})": {
            label: round(getattr(r, key), 4) for key, label in SIGNALS.items()
        }
        for r in reports
    }
    write_metadata(ensemble_dir, metadata)
    card = write_model_card(ensemble_dir, metadata, model_name="trl-renyi-demo", dataset_name=DATASET_NAME)
    plots = [
        plot_routing(routing, ensemble.member_names, out_dir / "routing.png"),
        plot_uncertainty(reports, out_dir / "uncertainty.png"),
    ]
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    result = DemoResult(
        routing=routing,
        families=reports,
        answers=answers,
        gap=gap,
        ensemble_dir=ensemble_dir,
        plots=plots,
        model_card=card,
        train_seconds=train_seconds,
        wall_seconds=wall,
        cpu_seconds=cpu,
        log_history=list(trainer.state.log_history),
    )
    (out_dir / "results.json").write_text(
        json.dumps(
            {
                "config": asdict(config),
                "routing": routing,
                "families": [asdict(r) for r in reports],
                "gap": gap,
                "answers": answers,
                "per_item": per_item,
                "train_seconds": train_seconds,
                "wall_seconds": wall,
                "cpu_seconds": cpu,
                "torch_threads": torch.get_num_threads(),
            },
            indent=2,
        )
        + "\n"
    )
    print_fn(format_report(result, ensemble.member_names, config, out_dir))
    return result


def format_report(result: DemoResult, member_names: list[str], config: DemoConfig, out_dir) -> str:
    lines = ["", "=" * 100, "", format_routing_table(result.routing, member_names, config.alpha), ""]
    lines += [format_family_table(result.families), "", format_gap(result.gap), ""]
    if result.answers:
        lines.append(
            "Held-out answers of each member and of the posterior-weighted mixture (greedy). Per prompt: the max "
            "per-token mutual information while answering; per answer: ℓ spread = std over members of log p_k(answer)."
        )
        lines.extend(_answers_block(result.answers))
        lines.append("")
    lines += [
        f"Ensemble:    {result.ensemble_dir}  (member_k/ PEFT adapters, renyi_ensemble.json)",
        f"Model card:  {result.model_card}",
        f"Plots:       {', '.join(str(p) for p in result.plots)}",
        f"Results:     {Path(out_dir) / 'results.json'}",
        f"Time: {result.wall_seconds:.0f} s in all ({result.train_seconds:.0f} s training), "
        f"{result.cpu_seconds:.0f} s of CPU time on {torch.get_num_threads()} threads.",
    ]
    return "\n".join(lines)


def _answers_block(answers: list[dict]) -> list[str]:
    lines, seen = [], []
    for row in answers:
        key = (row["family"], row["prompt"])
        if key not in seen:
            seen.append(key)
    for family, prompt in seen:
        rows = [row for row in answers if (row["family"], row["prompt"]) == (family, prompt)]
        kind = "contradictory" if FAMILIES[family].contradictory else "consistent"
        first_token_mi = max(row["token_mi_max"] for row in rows)
        lines.append(f"  [{family}, {kind}] {prompt!r}   max token MI {first_token_mi:.3f}")
        for row in rows:
            line = f"      {row['source']:<10} {row['answer'][:40]!r:<44} ℓ spread {row['loglik_std']:6.2f}"
            if row["source"] == "mixture":
                line += "   member posterior " + " ".join(f"{w:.2f}" for w in row["member_posterior"])
            lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    from trl_renyi.cli.parsing import RenyiParser

    (config,) = RenyiParser((DemoConfig,), prog="trl-renyi demo").parse_args_and_config(argv)
    run_demo(config)
    return 0
