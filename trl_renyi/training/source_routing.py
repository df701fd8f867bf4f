r"""Routing by source: every row names where it came from (an annotator id, the dataset it was drawn from), and the
α-Rényi bound is taken over sources instead of rows (:func:`~trl_renyi.objective.source_renyi_bound`).

``RenyiSFTConfig(source_column="annotator")`` reads the source of every row from that column: one id per
prompt/completion row, or, in a multi-annotator row, one id for the row or a list parallel to ``completions`` (one
annotator per vote). A source's log-likelihood under member k is the weighted sum over all its rows,
:math:`L_{sk} = \sum_{i\in s} w_i \ell_{ik}`, so a member is responsible for a whole source: each annotator follows one
member's convention, and members become a mixture of annotators rather than label specialists.

A batch holds only some of a source's rows. :class:`SourceMemory` keeps, for every source, the last estimate of
:math:`L_{sk}` (detached) and is updated after every training batch by stochastic EM: with :math:`W_s` the source's
total weight in the training set and :math:`b_s` its weight in the batch, the rest of the source is estimated as
:math:`O_{sk} = (1 - b_s / W_s)\, L^{\text{memory}}_{sk}` (the batch's rows replace their share of the memory), the
batch's own log-likelihoods are added, and the result becomes the new memory. Unseen rows count 0, so routing starts
from what has been seen and sharpens as the memory fills. A source that is entirely in the batch (one row per source)
has :math:`O = 0` and the bound is exact.

The memory is trainer state across steps; it lives in :class:`SourceMemory`, owned by the trainer, is updated only
by training batches (evaluation reads it), and is saved with every checkpoint as ``source_routing.pt``.
"""

from __future__ import annotations

import torch

from trl_renyi.data.multi_completion import SOURCE_ID_COLUMN

#: the checkpoint file holding the memory
MEMORY_FILE = "source_routing.pt"


class SourceMemory:
    """The stochastic-EM memory of every source's log-likelihood under each member (module docstring).

    Args:
        names: the source ids, in the order of their integer ids.
        total_weight: ``(S,)`` each source's total weight in the training set, :math:`W_s` (0 for a source seen only
            in evaluation data).
        num_members: K.
    """

    def __init__(self, names: list, total_weight: torch.Tensor, num_members: int):
        self.names = list(names)
        self.total_weight = torch.as_tensor(total_weight, dtype=torch.float64)
        self.loglik = torch.zeros(len(self.names), num_members, dtype=torch.float64)

    @property
    def num_sources(self) -> int:
        return len(self.names)

    def batch_view(self, source_ids: torch.Tensor, weights: torch.Tensor | None):
        """``(unique ids (S_b,), batch-local index (N,), others (S_b, K))`` for a batch's examples."""
        unique, local = torch.unique(source_ids.cpu(), return_inverse=True)
        w = torch.ones(len(source_ids), dtype=torch.float64) if weights is None else weights.detach().double().cpu()
        batch_weight = torch.zeros(len(unique), dtype=torch.float64).index_add(0, local, w)
        total = torch.maximum(self.total_weight[unique], batch_weight)
        keep = (1.0 - batch_weight / total.clamp(min=1e-12)).clamp(0.0, 1.0)
        return unique, local.to(source_ids.device), keep.unsqueeze(-1) * self.loglik[unique]

    def update(self, unique: torch.Tensor, source_loglik: torch.Tensor) -> None:
        """Store the batch's full source log-likelihoods (after a training batch)."""
        self.loglik[unique] = source_loglik.detach().double().cpu()

    def responsibilities(self, log_weights: torch.Tensor, alpha: float) -> torch.Tensor:
        """``(S, K)`` the routing of every source from the memory alone (for reports)."""
        return torch.softmax(log_weights.double().cpu() + (1.0 - alpha) * self.loglik, dim=-1)

    def encode(self, dataset, weight_column: str, train: bool):
        """``dataset`` (expanded rows with ``SOURCE_ID_COLUMN`` strings) with every source replaced by its integer id;
        sources not seen before join the memory (with a training dataset adding its rows' weights to their total
        :math:`W_s`; an evaluation dataset's own sources get a total of 0)."""
        if dataset is None or SOURCE_ID_COLUMN not in dataset.column_names:
            return dataset
        ids = {name: index for index, name in enumerate(self.names)}
        weights = dataset[weight_column] if weight_column in dataset.column_names else [1.0] * len(dataset)
        totals = self.total_weight.tolist()
        for source, weight in zip(dataset[SOURCE_ID_COLUMN], weights):
            key = str(source)
            if key not in ids:
                ids[key] = len(ids)
                self.names.append(key)
                totals.append(0.0)
            if train:
                totals[ids[key]] += float(weight)
        self.total_weight = torch.tensor(totals, dtype=torch.float64)
        added = len(self.names) - self.loglik.shape[0]
        if added:
            self.loglik = torch.cat([self.loglik, self.loglik.new_zeros(added, self.loglik.shape[1])])
        return dataset.map(lambda row: {SOURCE_ID_COLUMN: ids[str(row[SOURCE_ID_COLUMN])]})

    def state_dict(self) -> dict:
        return {"names": self.names, "total_weight": self.total_weight, "loglik": self.loglik}

    def load_state_dict(self, state: dict) -> None:
        if list(state["names"]) != self.names or tuple(state["loglik"].shape) != tuple(self.loglik.shape):
            raise ValueError(
                f"the checkpoint's {MEMORY_FILE} holds {len(state['names'])} sources × {state['loglik'].shape[-1]} "
                f"members, this run {self.num_sources} × {self.loglik.shape[-1]}: resume with the same data and members"
            )
        self.loglik = state["loglik"].double().clone()
