r"""A completion-only, token-chunked LM head for member-batched training.

TRL's fused head projects every position of the batch through the vocabulary on CPU (it compacts to the labelled
positions only on its Triton path) with a 32768-wide vocabulary tile, which grows faster than linearly with the
tokens. A K-tiled batch multiplies the tokens by K, so this head:

1. runs the backbone, keeps only the positions whose next-token label is not ``-100`` (the completion tokens), and
2. computes, for chunks of those positions,

   .. math::

       \log p(y_t) = z_{t, y_t} - \operatorname{logsumexp}_v z_{t,v}, \qquad z_t = W h_t,

   in float32. With a frozen head (LoRA) the forward also computes each position's gradient direction
   :math:`d_t = W_{y_t} - p_t^\top W` and saves only that, so the backward is :math:`\partial/\partial h_t = g_t\,d_t`:
   two vocabulary matmuls per position in all, as in a plain LM head's forward and backward. A trainable head saves
   ``h``, the labels and the log-normaliser instead, and its backward recomputes each chunk's logits for
   :math:`g_t\,(e_{y_t} - p_t)^\top W` and the weight gradient.

Memory for the logits is bounded by the chunk, cost is linear in the completion tokens. The output has the same
fields as TRL's ``FusedCausalLMOutput`` (``log_probs``, ``entropy``, ``is_top1``, ``label_mask``, ``aux_loss``), so
the two are interchangeable; models with logit soft-capping, logit scaling or an LM-head bias keep TRL's head.

The head's weight is read outside the head module's own forward, so it is made whole wherever an engine splits it,
as TRL's fused head does: a ZeRO-3-partitioned weight is all-gathered for the forward (and again for the recomputing
backward of a trainable head; :func:`~trl_renyi.compat.gather_partitioned_parameters`), an FSDP2 ``DTensor`` is turned into the full
tensor (differentiably), and under ``device_map`` the hidden states move to the head's device.

For MoE models called with ``output_router_logits=True`` the output's ``aux_loss`` is the mean over the K members of
each member's own load-balancing loss (the rows of member k are its own routing decisions); with K = 1 it is the
model's ``aux_loss``.
"""

from __future__ import annotations

import functools
import types

import torch
from torch.distributed.tensor import DTensor

from trl_renyi.compat import (
    FusedCausalLMOutput,
    gather_partitioned_parameters,
    load_balancing_loss,
)

# Rows per chunk are chosen so that one chunk of float32 logits takes about this many bytes.
_CHUNK_BYTES = 64 * 2**20
_SCALING_ATTRIBUTES = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


class _CompletionLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, rows_per_chunk):
        with gather_partitioned_parameters(weight):
            return _CompletionLogProbs._forward(ctx, hidden, weight, labels, rows_per_chunk)

    @staticmethod
    def _forward(ctx, hidden, weight, labels, rows_per_chunk):
        count = hidden.shape[0]
        log_probs = torch.empty(count, device=hidden.device, dtype=torch.float32)
        log_norm = torch.empty_like(log_probs)
        entropy = torch.empty_like(log_probs)
        is_top1 = torch.empty(count, device=hidden.device, dtype=torch.bool)
        # With a frozen head (the LoRA case) the gradient is known up to the upstream scalar of each token:
        # ∂ log p(y_t)/∂h_t = W_{y_t} − p_tᵀW. Computing that direction here costs the one matmul the backward would
        # otherwise spend, and saves recomputing the logits there (and gathering a partitioned head again).
        direct = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        direction = torch.empty_like(hidden) if direct else None
        for start in range(0, count, rows_per_chunk):
            end = min(start + rows_per_chunk, count)
            logits = (hidden[start:end] @ weight.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            log_norm[start:end] = lse
            log_probs[start:end] = logits.gather(-1, labels[start:end, None]).squeeze(-1) - lse
            probs = torch.exp(logits - lse[:, None])
            entropy[start:end] = lse - (probs * logits).sum(-1)
            is_top1[start:end] = logits.argmax(-1) == labels[start:end]
            if direct:
                direction[start:end] = weight[labels[start:end]] - probs.to(hidden.dtype) @ weight
        if direct:
            ctx.save_for_backward(direction)
        else:
            ctx.save_for_backward(hidden, weight, labels, log_norm)
        ctx.direct = direct
        ctx.weight_parameter = weight  # the parameter itself: a partitioned one is gathered again in the backward
        ctx.rows_per_chunk = rows_per_chunk
        ctx.mark_non_differentiable(entropy, is_top1)
        return log_probs, entropy, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs, _grad_entropy, _grad_top1):
        if ctx.direct:
            (direction,) = ctx.saved_tensors
            return grad_log_probs.to(direction.dtype)[:, None] * direction, None, None, None
        hidden, weight, labels, log_norm = ctx.saved_tensors
        with gather_partitioned_parameters(ctx.weight_parameter):
            return _CompletionLogProbs._backward(ctx, grad_log_probs, hidden, ctx.weight_parameter, labels, log_norm)

    @staticmethod
    def _backward(ctx, grad_log_probs, hidden, weight, labels, log_norm):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_weight else None
        step = ctx.rows_per_chunk
        for start in range(0, hidden.shape[0], step):
            end = min(start + step, hidden.shape[0])
            g = grad_log_probs[start:end].float()
            logits = (hidden[start:end] @ weight.T).float()
            grad_logits = torch.exp(logits - log_norm[start:end, None]).mul_(-g[:, None])
            grad_logits.scatter_add_(1, labels[start:end, None], g[:, None])
            grad_logits = grad_logits.to(hidden.dtype)
            if need_hidden:
                grad_hidden[start:end] = grad_logits @ weight
            if need_weight:
                grad_weight += (grad_logits.T @ hidden[start:end]).float()
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def completion_log_probs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rows_per_chunk=None):
    """Log-probability, entropy and top-1 hit of ``labels`` (N,) under ``softmax(hidden @ weight.T)``, chunked.

    ``hidden`` is ``(N, d)``, ``weight`` ``(V, d)``. Only the log-probs carry gradients.
    """
    if isinstance(weight, DTensor):  # FSDP2: the full head, gathered differentiably
        weight = weight.full_tensor()
    vocab = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 keeps the full shape in ds_shape
    if rows_per_chunk is None:
        rows_per_chunk = max(1, _CHUNK_BYTES // (4 * vocab))
    return _CompletionLogProbs.apply(hidden.to(weight.device), weight, labels.to(weight.device), int(rows_per_chunk))


def member_load_balancing_loss(router_logits, num_members: int, tokens_per_member: int, config, attention_mask=None):
    r"""Mean over the K members of each member's MoE load-balancing loss.

    ``router_logits`` holds one ``(rows, E)`` tensor per MoE layer of a member-batched forward: K·n rows where the
    batch was tiled (member k's are block k), n rows in a shared trunk before the first adapted layer (the same for
    every member), n being ``tokens_per_member``. ``attention_mask`` covers K·n or n positions, or is ``None``
    (padding-free). With :math:`L_k` the Switch-Transformer loss of member k's own routing, the result is
    :math:`\frac1K\sum_k L_k`; for K = 1 the model's own ``aux_loss``.
    """
    num_experts, top_k = config.num_experts, config.num_experts_per_tok
    if num_members == 1:
        return load_balancing_loss(tuple(router_logits), num_experts, top_k, attention_mask)
    n, total = tokens_per_member, 0.0
    for k in range(num_members):
        layers = []
        for logits in router_logits:
            if logits.shape[0] == num_members * n:
                layers.append(logits[k * n : (k + 1) * n])
            elif logits.shape[0] == n:
                layers.append(logits)
            else:
                raise ValueError(f"router logits of {logits.shape[0]} rows for {num_members} members of {n} tokens")
        mask = attention_mask
        if mask is not None and mask.numel() == num_members * n:
            mask = mask.reshape(num_members, -1)[k]
        total = total + load_balancing_loss(tuple(layers), num_experts, top_k, mask)
    return total / num_members


def supports_completion_head(model) -> bool:
    """Whether ``model``'s logits are a plain ``lm_head(h)`` (no soft-capping, scaling or bias)."""
    config = model.config.get_text_config()
    if any(getattr(config, name, None) not in (None, 1.0) for name in _SCALING_ATTRIBUTES):
        return False
    head = model.get_output_embeddings()
    return isinstance(head, torch.nn.Linear) and head.bias is None


def has_completion_head(model) -> bool:
    """Whether :func:`add_completion_lm_head` patched ``model`` (the base model under the adapters)."""
    return bool(getattr(model, "_renyi_completion_head", False))


def add_completion_lm_head(model) -> bool:
    """Patch ``model.forward`` so that ``model(..., labels=labels, completion_head=True)`` returns a
    ``FusedCausalLMOutput`` computed by the completion-only chunked head. Other calls are unchanged.

    Returns ``False`` (and patches nothing) when the model's logits are not a plain linear head. Idempotent.
    """
    if has_completion_head(model):
        return True
    if not supports_completion_head(model):
        return False
    previous_forward = model.forward
    backbone_name = model.base_model_prefix
    text_config = model.config.get_text_config()

    @functools.wraps(type(model).forward)
    def forward(self, *args, completion_head=False, labels=None, num_members=1, **kwargs):
        if not completion_head:
            if labels is not None:
                kwargs["labels"] = labels
            return previous_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        backbone_outputs = getattr(self, backbone_name)(*args, **kwargs)
        head = self.get_output_embeddings()
        hidden_states = backbone_outputs.last_hidden_state[:, :-1]
        shifted = labels[:, 1:].to(hidden_states.device)
        mask = shifted != -100
        log_probs, entropy, is_top1 = completion_log_probs(hidden_states[mask], head.weight, shifted[mask])
        mask = mask.to(log_probs.device)
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = member_load_balancing_loss(
                backbone_outputs.router_logits, num_members, labels.numel() // num_members, text_config,
                kwargs.get("attention_mask"),
            )  # fmt: skip
        zeros = torch.zeros(mask.shape, device=log_probs.device, dtype=torch.float32)
        return FusedCausalLMOutput(
            log_probs=zeros.masked_scatter(mask, log_probs),
            entropy=zeros.masked_scatter(mask, entropy),
            is_top1=torch.zeros_like(mask).masked_scatter(mask, is_top1),
            label_mask=mask,
            aux_loss=aux_loss,
        )

    model.forward = types.MethodType(forward, model)
    model._renyi_completion_head = True
    return True
