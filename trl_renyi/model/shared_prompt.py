r"""One prompt pass for every completion of that prompt: a packed layout with a prefix-sharing attention mask.

Several sequences that start with the same prompt (DPO's chosen and rejected answers, the weighted completions of a
multi-annotator row) are laid out as one packed row

.. code-block:: text

    p_1 … p_{s-1} | p_s c^1_1 … c^1_{m_1} | p_s c^2_1 … c^2_{m_2} | …
    shared prefix   segment 1              segment 2

where :math:`p_1 … p_s` is their longest common prefix of unscored tokens. Each segment starts with its own copy of
the last shared token :math:`p_s` at the prompt's position :math:`s-1`, so the first completion token is predicted
from a hidden state that sees exactly the prompt. The attention mask lets a token attend to an earlier token of the
shared prefix or of its own segment, never to another segment; position ids continue the prompt in every segment.
Each token's hidden state therefore equals the one it has in its own unshared sequence,

.. math::

    h(c^j_t) = f\big(p_1 … p_s, c^j_1 … c^j_t\big) \quad\text{(same tokens, same positions, same causal context)},

so the log-probabilities, the loss and the gradients (which flow into the shared prompt from every segment) equal
those of the unshared computation, while the prompt's tokens run once instead of once per completion. The copy of
:math:`p_s` costs one token per completion. Labels of the segment-start copies are ``-100`` (they would be predicted
across a segment boundary), so nothing outside the completions is scored.

The layout needs an attention implementation that takes an arbitrary 4-D mask (``sdpa`` as a boolean mask, ``eager``
as an additive one) and explicit ``position_ids``; :func:`shared_prompt_refusal` names what stands in the way.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from trl_renyi.compat import config_attn_implementation

if TYPE_CHECKING:  # resolved lazily by compat (a TRL type; this module imports without TRL)
    from trl_renyi.compat import FusedCausalLMOutput

#: Batch keys that describe the layout and are not model inputs (removed before every forward).
LAYOUT_KEYS = ("completion_weights", "example_index", "num_sequence_tokens", "row_index", "source_ids")

_MASK_IMPLEMENTATIONS = ("sdpa", "eager")


def shared_prefix_length(sequences: list[list[int]], labels: list[list[int]]) -> int:
    """Length of the longest common prefix of ``sequences`` whose tokens are scored in none of them (label -100)."""
    if not sequences:
        return 0
    shortest = min(len(s) for s in sequences)
    length = 0
    first = sequences[0]
    while length < shortest and all(s[length] == first[length] for s in sequences) and all(
        lab[length] == -100 for lab in labels
    ):
        length += 1
    return length


@dataclass
class SharedPromptBatch:
    """A packed batch (see the module docstring) and the map back to the sequences it holds.

    Attributes:
        input_ids, position_ids, labels: ``(R, T)`` packed rows (``labels`` -100 where nothing is scored).
        attention_mask: ``(R, 1, T, T)`` boolean, True where a query token may attend to a key token.
        example_index: ``(R, T)`` index of the sequence whose token sits at each position (0 where unlabelled).
        packed_positions, sequence_positions: ``(M,)`` for the M scored tokens, the flat index of the shifted
            log-prob in the packed ``(R, T−1)`` grid and in the unshared ``(N, L−1)`` grid of the sequences.
        num_sequences, sequence_length: N and L, the unshared layout (``L`` the longest sequence).
        num_sequence_tokens: tokens of the N unshared sequences (what an unshared batch would have held).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    example_index: torch.Tensor
    packed_positions: torch.Tensor
    sequence_positions: torch.Tensor
    num_sequences: int
    sequence_length: int
    num_sequence_tokens: int

    def model_inputs(self, attention_implementation: str, dtype: torch.dtype) -> dict:
        """``input_ids``, ``position_ids``, ``labels`` and the 4-D mask in the form the attention implementation takes
        (boolean for ``sdpa``; additive, 0 or the dtype's minimum, for ``eager``)."""
        mask = self.attention_mask
        if attention_implementation == "eager":
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "attention_mask": mask,
            "labels": self.labels,
        }

    def to(self, device) -> SharedPromptBatch:
        fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return SharedPromptBatch(**fields)

    def unpack(self, outputs, num_members: int) -> FusedCausalLMOutput:
        """Per-token outputs of a member-batched forward of this batch (``(K·R, T−1)`` fields) moved to the unshared
        layout ``(K·N, L−1)`` of the sequences, zero where a sequence has no scored token. Differentiable in
        ``log_probs``; ``aux_loss`` is passed through."""
        from trl_renyi.compat import FusedCausalLMOutput
        rows, width = self.input_ids.shape
        grid = self.num_sequences * (self.sequence_length - 1)

        def move(values: torch.Tensor) -> torch.Tensor:
            flat = values.reshape(num_members, rows * (width - 1))
            picked = flat.index_select(1, self.packed_positions.to(flat.device))
            out = flat.new_zeros(num_members, grid)
            out = out.index_copy(1, self.sequence_positions.to(flat.device), picked)
            return out.reshape(num_members * self.num_sequences, self.sequence_length - 1)

        return FusedCausalLMOutput(
            log_probs=move(outputs.log_probs),
            entropy=move(outputs.entropy),
            is_top1=move(outputs.is_top1),
            label_mask=move(outputs.label_mask),
            aux_loss=getattr(outputs, "aux_loss", None),
        )


def pack_shared_prompts(
    groups: list[list[tuple]],
    pad_token_id: int,
    padding_free: bool = False,
    pad_to_multiple_of: int | None = None,
    sequence_length: int | None = None,
) -> SharedPromptBatch:
    """Pack ``groups`` of sequences that share a prompt (see the module docstring).

    Args:
        groups: one list per prompt of ``(input_ids, labels)`` or ``(input_ids, labels, row)`` sequences, ``labels[u]``
            the target of token u (its own id where it is scored, ``-100`` elsewhere), as TRL's prepared datasets
            hold them. ``row`` is the sequence's row in the unshared layout and its ``example_index``; without it the
            sequences are numbered group by group in order.
        pad_token_id: the id written into padding positions.
        padding_free: all groups in one row (the mask keeps the groups apart) instead of one row per group.
        pad_to_multiple_of: pad the row length to a multiple of this.
        sequence_length: width L of the unshared layout (default: the longest sequence).
    """
    rows_ids, rows_pos, rows_lab, rows_ex, rows_group, rows_seg = [], [], [], [], [], []
    packed_positions, sequence_positions = [], []
    cur = ([], [], [], [], [], [])
    sequence_number, longest, total_tokens = 0, 1, 0
    for group_number, group in enumerate(groups):
        ids_list = [list(map(int, seq[0])) for seq in group]
        lab_list = [list(map(int, seq[1])) for seq in group]
        row_list = [int(seq[2]) if len(seq) > 2 else sequence_number + j for j, seq in enumerate(group)]
        for ids, lab in zip(ids_list, lab_list):
            if len(ids) != len(lab):
                raise ValueError(f"input_ids and labels of one sequence differ in length ({len(ids)} vs {len(lab)})")
            longest, total_tokens = max(longest, len(ids)), total_tokens + len(ids)
        shared = shared_prefix_length(ids_list, lab_list)
        start = shared - 1 if shared > 0 else 0
        ids_row, pos_row, lab_row, ex_row, group_row, seg_row = cur
        ids_row += ids_list[0][:start] if ids_list else []
        pos_row += list(range(start))
        lab_row += [-100] * start
        ex_row += [0] * start
        group_row += [group_number] * start
        seg_row += [-1] * start
        for segment, (ids, lab, number) in enumerate(zip(ids_list, lab_list, row_list)):
            offset = len(ids_row)
            piece = ids[start:]
            ids_row += piece
            pos_row += list(range(start, len(ids)))
            lab_row += [-100] + lab[start + 1 :] if piece else []
            ex_row += [number] * len(piece)
            group_row += [group_number] * len(piece)
            seg_row += [segment] * len(piece)
            for t in range(1, len(piece)):
                if lab[start + t] != -100:
                    packed_positions.append((len(rows_ids), offset + t - 1))
                    sequence_positions.append((number, start + t - 1))
            sequence_number += 1
        if not padding_free:
            for target, row in zip((rows_ids, rows_pos, rows_lab, rows_ex, rows_group, rows_seg), cur):
                target.append(row)
            cur = ([], [], [], [], [], [])
    if padding_free:
        for target, row in zip((rows_ids, rows_pos, rows_lab, rows_ex, rows_group, rows_seg), cur):
            target.append(row)
    longest = max(longest, sequence_length or 0)
    width = max(2, max(len(r) for r in rows_ids))
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of

    def padded(rows, value):
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)

    input_ids, position_ids, labels = padded(rows_ids, pad_token_id), padded(rows_pos, 0), padded(rows_lab, -100)
    example_index, group, segment = padded(rows_ex, 0), padded(rows_group, -1), padded(rows_seg, -1)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same_group = group[:, :, None] == group[:, None, :]
    visible = (segment[:, None, :] == -1) | (segment[:, :, None] == segment[:, None, :])
    attention_mask = (same_group & visible & causal)[:, None]  # padding attends to earlier padding: never empty
    packed = torch.tensor([r * (width - 1) + t for r, t in packed_positions], dtype=torch.long)
    unshared = torch.tensor([n * (longest - 1) + u for n, u in sequence_positions], dtype=torch.long)
    return SharedPromptBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        labels=labels,
        example_index=example_index,
        packed_positions=packed,
        sequence_positions=unshared,
        num_sequences=sequence_number,
        sequence_length=max(longest, 2),
        num_sequence_tokens=total_tokens,
    )


def pack_preference_pairs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor, pad_token_id: int
) -> SharedPromptBatch:
    """The shared layout of a TRL preference batch: rows ``[chosen_1 … chosen_B; rejected_1 … rejected_B]``
    (``(2B, L)``, padded) become one packed row per pair; :meth:`SharedPromptBatch.unpack` returns to the 2B rows."""
    pairs = input_ids.shape[0] // 2
    ids, keep, scored = input_ids.tolist(), attention_mask.bool().tolist(), completion_mask.bool().tolist()

    def sequence(row):
        tokens = [t for t, k in zip(ids[row], keep[row]) if k]
        labels = [t if s else -100 for t, s, k in zip(ids[row], scored[row], keep[row]) if k]
        return tokens, labels, row

    groups = [[sequence(i), sequence(pairs + i)] for i in range(pairs)]
    packed = pack_shared_prompts(groups, pad_token_id, sequence_length=input_ids.shape[1])
    return packed.to(input_ids.device)


def shared_prompt_refusal(model) -> str | None:
    """Why ``model`` cannot run the shared-prompt layout exactly, or ``None`` when it can."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    implementation = config_attn_implementation(model.config)
    if implementation not in _MASK_IMPLEMENTATIONS:
        return (
            f"attn_implementation={implementation!r} does not take a custom 4-D attention mask (use one of "
            f"{list(_MASK_IMPLEMENTATIONS)})"
        )
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "sliding_window", None) and (
        any("sliding" in str(t) for t in layer_types) or getattr(config, "use_sliding_window", False)
    ):
        return "the model uses sliding-window attention, which a custom attention mask would switch off"
    if getattr(config, "num_experts_per_tok", None) or getattr(config, "output_router_logits", False):
        return (
            "the model is a mixture of experts, whose load-balancing loss counts the prompt's tokens once per sequence"
        )
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "position_ids" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward takes no position_ids"
    return None


def model_inputs_only(inputs: dict) -> dict:
    """``inputs`` without the layout keys (:data:`LAYOUT_KEYS`), which describe the batch but are no model inputs."""
    return {k: v for k, v in inputs.items() if k not in LAYOUT_KEYS}


def attention_implementation(model) -> str:
    return config_attn_implementation(model.config) or "eager"
