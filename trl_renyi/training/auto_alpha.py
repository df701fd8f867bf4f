r"""``alpha="auto"``: α chosen from the data by the local stability criterion at the end of the α = 1 warm-up.

During the warm-up every member fits all the data (α = 1 is an independent ensemble trained on the same batches), so
one member is a one-model fit θ*. At the first step after the warm-up, :class:`AutoAlpha` measures the criterion
(:func:`trl_renyi.stability.measure_stability`) on ``auto_alpha_units`` randomly drawn training units — the units the
bound is taken over: completions (or multi-annotator rows with ``multi_annotator_routing="row"``, sources with
``source_column``) for SFT, preference pairs for DPO — at member 0, and sets α to the recommendation: the geometric
middle of the window where the directions whose eigenvalue clears the null's 95 % quantile λ₀ spread and the bulk
does not,

.. math::

    (1-\varphi)(1-\alpha) = 1 / \sqrt{\lambda_1 \lambda_0},

with φ the responsibility floor; when λ₁ does not clear λ₀, α stays 1 and the log says why. The resolution is logged
(``renyi/alpha``, ``renyi/lambda1``, ``renyi/lambda_null`` with every later log), measured on the main process and
sent to the others (identical on every rank), saved with every checkpoint (``auto_alpha.json``) and restored on
resume, and recorded in ``renyi_ensemble.json`` (field ``alpha_auto``) and the model card.

With preference pairs the member likelihood is the Bradley–Terry :math:`\log\sigma(m)` of TRL's ``sigmoid`` loss (its
label-smoothed and ``robust`` variants are measured at the same margins).
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate.utils import broadcast_object_list
from datasets import Dataset, IterableDataset
from transformers import TrainerCallback

from trl_renyi.objective import AUTO_ALPHA
from trl_renyi.stability import measure_stability

logger = logging.getLogger(__name__)

#: the checkpoint file holding the resolution
RESOLUTION_FILE = "auto_alpha.json"
LAMBDA1_METRIC = "renyi/lambda1"
LAMBDA_NULL_METRIC = "renyi/lambda_null"


@dataclass
class AlphaResolution:
    """What ``alpha="auto"`` chose and why.

    Attributes:
        alpha: the α in force after the warm-up.
        step: the optimizer step at which it was measured.
        lambda1: the top generalised eigenvalue; ``lambda_null``: the null's 95 % quantile λ₀ it had to clear
            (``None`` when nothing was measured, e.g. one member).
        alpha_critical: 1 − 1/((1−φ)λ₁), below which the top direction spreads.
        significant: whether λ₁ cleared λ₀.
        num_units: the units measured; ``seconds``: how long it took; ``reason``: one sentence.
    """

    alpha: float
    step: int
    lambda1: float | None
    lambda_null: float | None
    alpha_critical: float | None
    significant: bool
    num_units: int
    seconds: float
    reason: str

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> AlphaResolution:
        return cls(**{k: values.get(k) for k in cls.__dataclass_fields__})


def warmup_steps(args, max_steps: int) -> int:
    """The first optimizer step at which α is no longer held at 1 (``objective.alpha_at_step``)."""
    return math.ceil(args.alpha_warmup_ratio * max_steps)


class AutoAlpha(TrainerCallback):
    """Resolves ``alpha="auto"`` for one trainer (module docstring). The trainer reads :attr:`alpha`."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.resolution: AlphaResolution | None = None

    @property
    def alpha(self) -> float:
        """The resolved α (1 until it is resolved: the warm-up's α)."""
        return self.resolution.alpha if self.resolution is not None else 1.0

    def metrics(self) -> dict[str, float]:
        """The logged figures of the resolution (empty before it, or when nothing was measured)."""
        if self.resolution is None or self.resolution.lambda1 is None:
            return {}
        return {LAMBDA1_METRIC: self.resolution.lambda1, LAMBDA_NULL_METRIC: self.resolution.lambda_null}

    def on_step_begin(self, args, state, control, **kwargs):
        if args.alpha != AUTO_ALPHA or self.resolution is not None:
            return
        if state.global_step >= warmup_steps(args, state.max_steps):
            self.resolve(state.global_step)

    def resolve(self, step: int) -> AlphaResolution:
        """Measure on the main process, share with the others, log."""
        trainer = self.trainer
        resolution = None
        if trainer.accelerator.is_main_process:
            resolution = measure(trainer, step)
        if trainer.accelerator.num_processes > 1:
            shared = [resolution.to_dict() if resolution is not None else None]
            broadcast_object_list(shared, from_process=0)
            resolution = AlphaResolution.from_dict(shared[0])
        self.resolution = resolution
        logger.warning("alpha='auto' at step %d: α = %.4g. %s", step, resolution.alpha, resolution.reason)
        return resolution

    # ------------------------------------------------------------------ checkpoints
    def save(self, folder) -> None:
        if self.resolution is not None:
            (Path(folder) / RESOLUTION_FILE).write_text(json.dumps(self.resolution.to_dict(), indent=2) + "\n")

    def load(self, folder) -> None:
        path = Path(folder) / RESOLUTION_FILE
        if path.is_file():
            self.resolution = AlphaResolution.from_dict(json.loads(path.read_text()))


def measure(trainer, step: int) -> AlphaResolution:
    """The criterion on a sample of the trainer's training units, at member 0 (see the module docstring)."""
    args = trainer.args
    if args.num_members == 1:
        return AlphaResolution(1.0, step, None, None, None, False, 0, 0.0, "one member: α has no effect")
    votes = trainer.stability_votes(args.auto_alpha_units, args.seed)
    model = trainer.accelerator.unwrap_model(trainer.model)
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    report = measure_stability(
        model, tokenizer, votes, adapter=trainer.member_names[0], floor=args.responsibility_floor,
        damping=args.auto_alpha_damping, sketch_dim=args.auto_alpha_sketch_dim, null_draws=args.auto_alpha_null_draws,
        max_units=args.auto_alpha_units, seed=args.seed, show_progress=not args.disable_tqdm,
        gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
    )  # fmt: skip
    logger.info("Stability criterion at the end of the warm-up:\n%s", report.summary())
    return AlphaResolution(
        alpha=report.recommended_alpha,
        step=step,
        lambda1=report.lambda1,
        lambda_null=report.null_edge,
        alpha_critical=report.alpha_critical_floor,
        significant=report.significant,
        num_units=report.num_units,
        seconds=report.seconds,
        reason=report.reason,
    )


def sample_rows(dataset, count: int, seed: int):
    """At most ``count`` rows of ``dataset`` drawn at random (a ``Dataset``; an ``IterableDataset``'s first rows)."""
    if isinstance(dataset, IterableDataset):
        return Dataset.from_list(list(dataset.take(count)))
    if len(dataset) <= count:
        return dataset
    return dataset.select(sorted(random.Random(seed).sample(range(len(dataset)), count)))
