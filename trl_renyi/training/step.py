r"""The state of one training or prediction step, and the typed results passed between its stages.

A trainer's ``member_loglik`` runs one member-batched forward and returns a :class:`MemberLogLik`, which carries the
trainer's own normaliser (``normalise``); its ``compute_loss`` turns the ``loglik`` matrix into the α-Rényi bound,
normalises it, adds the MoE router auxiliary loss and logs metrics from it. DPO extends it with the per-pair
quantities TRL logs (:class:`PreferenceLogLik`).

What a step computes once and reads several times (DPO's reference log-probs and packed pair layout, the chunk of
members a chunked step is training) lives in a :class:`StepScope`, opened and closed by the step that owns it
(``training_step``, ``prediction_step``, or one routed forward called by hand) — never in the batch dict.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class MemberLogLik:
    r"""One member-batched forward of a batch.

    Attributes:
        loglik: ``(N, K_routed)`` log-likelihood :math:`\ell_{ik}` of example i under the k-th routed member.
        outputs: the ``FusedCausalLMOutput`` of the K·B tiled rows (per-token log-probs, entropy, top-1, label mask
            and, for MoE models asked for router logits, the members' mean load-balancing ``aux_loss``).
        num_tokens: ``(N,)`` completion tokens of each example (SFT), or ``None``.
        example_weights: ``(N,)`` weights of multi-annotator completions, or ``None`` (every example weighs 1).
        weighted: the batch held multi-annotator weights (folded into ``loglik`` and ``num_tokens`` when rows are
            routed whole), so a token count taken from the labels alone is not its normaliser.
        source_ids: ``(N,)`` the source of every example when the bound is taken over sources
            (``source_column``), or ``None``.
        normalise: the trainer's normaliser, ``loss = normalise(−Σ_i J_i)``, in TRL's own arithmetic (SFT: over the
            batch's completion tokens, ``num_items_in_batch`` under gradient accumulation; DPO: over the pairs, times
            the loss weight), so that K = 1 is TRL's loss.
        aux_scale: the factor of TRL's MoE load-balancing term (1 / the micro-batches it is averaged over).
    """

    loglik: torch.Tensor
    outputs: object
    num_tokens: torch.Tensor | None = None
    example_weights: torch.Tensor | None = None
    weighted: bool = False
    source_ids: torch.Tensor | None = None
    normalise: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss
    aux_scale: float = 1.0

    @property
    def num_examples(self) -> int:
        return int(self.loglik.shape[0])

    def weighted_sum(self, values: torch.Tensor) -> torch.Tensor:
        r""":math:`\sum_i w_i\,v_i` with the examples' weights (a plain sum when there are none)."""
        if self.example_weights is None:
            return values.sum()
        weights = self.example_weights
        if weights.shape[0] != values.shape[0]:
            raise ValueError(f"{weights.shape[0]} completion weights for {values.shape[0]} examples with completion tokens")
        return (weights.to(device=values.device, dtype=values.dtype) * values).sum()

    @property
    def router_aux_loss(self) -> torch.Tensor | None:
        return getattr(self.outputs, "aux_loss", None)


@dataclass
class PreferenceLogLik(MemberLogLik):
    """A DPO forward: ``loglik`` is each member's log-likelihood of the preference label; the other fields are
    ``(B, K_routed)``, detached, for TRL's reward metrics."""

    margins: torch.Tensor | None = None
    chosen_logratios: torch.Tensor | None = None
    rejected_logratios: torch.Tensor | None = None
    chosen_logps: torch.Tensor | None = None
    rejected_logps: torch.Tensor | None = None


@dataclass
class ChunkPass:
    """One chunk of members inside an exact chunked training step, in one of its two passes: ``scoring`` (no
    gradients; ``compute_loss`` only records the chunk's :class:`MemberLogLik`) or training (``compute_loss`` returns
    the chunk's surrogate, weighted by ``responsibilities`` ``(N, len(names))`` from the scoring pass and valued at
    ``value``: the step's loss on the ``last`` chunk, 0 before). ``steps`` collects every chunk's forward of the pass."""

    names: list[str]
    steps: list[MemberLogLik]
    responsibilities: torch.Tensor | None = None
    value: torch.Tensor | None = None
    last: bool = False
    scoring: bool = False

    @property
    def complete(self) -> bool:
        """The last chunk of the training pass: every chunk's forward is in ``steps`` (the time to log metrics)."""
        return self.last and not self.scoring


@dataclass
class StepScope:
    """State that lives for one step: values computed once per batch, by name, and the chunk being trained."""

    values: dict[str, tuple[object, object]] = field(default_factory=dict)
    chunk: ChunkPass | None = None

    def once(self, name: str, batch: object, compute: Callable[[], object]):
        """``compute()`` the first time ``name`` is asked for ``batch`` (compared by identity, e.g. the batch's
        ``input_ids`` tensor) in this step, the same value after that; another batch in the same block (a
        hand-written loop inside one ``member_routing``) is computed afresh, never served a stale value."""
        cached = self.values.get(name)
        if cached is None or cached[0] is not batch:
            self.values[name] = (batch, compute())
        return self.values[name][1]
