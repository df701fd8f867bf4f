"""The ensemble logic shared by RenyiSFTTrainer and RenyiDPOTrainer (one mixin, not two copies).

It builds (or validates) the K-member PeftModel before TRL's trainer sees it, turns a ``(B, K)`` matrix of
per-example member log-likelihoods into the α-Rényi loss, logs routing metrics through TRL's ``_metrics``, writes
``renyi_ensemble.json`` with every save, and restores all K members when resuming from a checkpoint.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from datasets import Dataset
from peft import PeftConfig, PeftModel
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import TrainingArguments, set_seed

from .checkpoint import AtomicCheckpointMixin
from .config import RenyiEnsembleArguments
from .ensemble import (
    ADAPTER_WEIGHTS,
    METADATA_FILE,
    PICKLE_ADAPTER_WEIGHTS,
    RenyiEnsemble,
    ensemble_metadata,
    read_metadata,
    write_metadata,
)
from .lm_head import add_completion_lm_head
from .members import attach_ensemble, build_ensemble, get_router, member_names, tile_for_members
from .models import is_embedded, load_causal_lm, load_tokenizer
from .objective import RenyiBound, alpha_at_step, normalized_log_weights, renyi_bound, routing_entropy


def coerce_config(args, config_class, model_name: str, suffix: str):
    """Return ``args`` as ``config_class``: a default one when ``None``, converted from plain TRL/HF arguments."""
    if args is None:
        return config_class(output_dir=f"{model_name.split('/')[-1]}-{suffix}")
    if isinstance(args, config_class):
        return args
    if isinstance(args, TrainingArguments):
        values = args.to_dict()
        values["hub_token"] = args.hub_token
        known = set(config_class.__dataclass_fields__)
        return config_class(**{k: v for k, v in values.items() if k in known})
    raise TypeError(f"args must be a {config_class.__name__}, got {type(args).__name__}.")


def load_member_weights(model: PeftModel, checkpoint: str | Path, names: list[str]) -> None:
    """Load every member's LoRA weights from ``checkpoint/member_k/adapter_model.safetensors`` in place."""
    checkpoint = Path(checkpoint)
    if (checkpoint / METADATA_FILE).is_file():
        recorded = read_metadata(checkpoint)["member_names"]
        if recorded != list(names):
            raise ValueError(
                f"{checkpoint / METADATA_FILE} records num_members={len(recorded)} but this trainer has "
                f"num_members={len(names)}; resume with the num_members the checkpoint was trained with."
            )
    for name in names:
        path = checkpoint / name / ADAPTER_WEIGHTS
        if not path.is_file() and (checkpoint / name / PICKLE_ADAPTER_WEIGHTS).is_file():
            raise ValueError(
                f"{checkpoint / name / PICKLE_ADAPTER_WEIGHTS} is a pickle file, which is never loaded (it can run "
                f"arbitrary code); member weights are read from {ADAPTER_WEIGHTS} only."
            )
        if not path.is_file():
            raise FileNotFoundError(
                f"Checkpoint {checkpoint} lacks {name}/{ADAPTER_WEIGHTS}; every member must be saved as safetensors."
            )
        result = set_peft_model_state_dict(model, load_file(str(path)), adapter_name=name)
        unexpected = [key for key in getattr(result, "unexpected_keys", []) if name in key or "lora_" in key]
        if unexpected:
            raise ValueError(f"{path} holds weights that fit no layer of the model: {unexpected[:5]}.")


class RenyiEnsembleTrainerMixin(AtomicCheckpointMixin):
    """Mixed into TRL trainers, before the TRL class in the bases. Checkpoints are published atomically."""

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _prepare_ensemble_model(model, args: RenyiEnsembleArguments, peft_config, processing_class):
        """Return ``(ensemble PeftModel, processing_class)`` to hand to TRL's constructor (with no peft_config)."""
        if isinstance(model, PeftModel):
            if peft_config is not None:
                raise ValueError(
                    "Pass either a PeftModel holding the member_* adapters or a base model with peft_config, not both."
                )
            return attach_ensemble(model, args.num_members), processing_class
        if peft_config is None:
            raise ValueError(
                "peft_config is required: a LoraConfig replicated into num_members LoRA members (or pass a PeftModel "
                "that already holds adapters member_0 … member_{K-1})."
            )
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(f"peft_config must be a peft.LoraConfig, got {type(peft_config).__name__}.")
        # Same seeding point as TRL: the first adapter's init draws from the RNG right after set_seed(args.seed).
        set_seed(args.seed)
        if isinstance(model, str):
            name = model
            init_kwargs = dict(args.model_init_kwargs or {})
            if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
                init_kwargs["device_map"] = None
            init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            dtype = init_kwargs.pop("dtype", "float32")
            model = load_causal_lm(name, dtype=dtype, **init_kwargs)
            if processing_class is None and is_embedded(name):
                processing_class = load_tokenizer(name)
            set_seed(args.seed)
        peft_model = build_ensemble(model, peft_config, args.num_members, args.seed, args.member_init_std)
        return peft_model, processing_class

    def _finish_ensemble_setup(self) -> None:
        args: RenyiEnsembleArguments = self.args
        self.member_names = member_names(args.num_members)
        self._renyi_log_weights = normalized_log_weights(args.num_members, args.member_weights)
        # TRL may have touched PEFT's active adapter (which freezes the others): every member trains.
        peft_model = self.accelerator.unwrap_model(self.model)
        attach_ensemble(peft_model, args.num_members)
        self._completion_head = add_completion_lm_head(peft_model.get_base_model())

    @property
    def num_members(self) -> int:
        return self.args.num_members

    @property
    def ensemble(self) -> RenyiEnsemble:
        """The trained ensemble as a :class:`RenyiEnsemble` (shares the trainer's model)."""
        return RenyiEnsemble(
            self.accelerator.unwrap_model(self.model),
            self.processing_class,
            alpha=self.args.alpha,
            member_weights=self.args.member_weights,
            metadata=self.args.renyi_metadata(),
        )

    # ------------------------------------------------------------------ forward
    def member_forward(self, model, inputs: dict):
        """One member-batched forward of ``inputs`` (B rows) through all K members.

        ``inputs`` must hold ``labels`` (-100 where no log-prob is needed). Uses the completion-only chunked head of
        :mod:`trl_renyi.lm_head` when the model allows it (TRL's fused head otherwise) and returns a
        ``FusedCausalLMOutput`` for the K·B tiled rows: ``log_probs`` ``(K·B, T−1)``, rows ``k·B … (k+1)·B − 1`` belonging to member k.
        """
        tiled = tile_for_members(inputs, self.num_members)
        if getattr(self, "_completion_head", False):
            return model(**tiled, completion_head=True)
        return model(**tiled, fused_lm_head=True)

    # ------------------------------------------------------------------ objective
    def current_alpha(self) -> float:
        """α in force at this optimizer step (1 during the α warm-up)."""
        state = getattr(self, "state", None)
        step = state.global_step if state is not None else 0
        max_steps = state.max_steps if state is not None else 0
        return alpha_at_step(self.args.alpha, self.args.alpha_warmup_ratio, step, max_steps)

    def _check_finite(self, loglik: torch.Tensor) -> None:
        """Raise ``FloatingPointError`` naming the step and the member(s) when any ℓ_ik is NaN or ±inf.

        It runs before the loss exists, so no backward pass and no optimizer step ever sees the bad values. Under
        distributed training the per-member count of bad entries is summed over the processes, so every process
        stops at the same step and none is left waiting in a collective.
        """
        local = ~torch.isfinite(loglik.detach())
        bad = local.sum(0).float()
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if not bool(bad.any()):
            return
        members = ", ".join(self.member_names[k] for k in bad.nonzero().flatten().tolist())
        state = getattr(self, "state", None)
        step = state.global_step + 1 if state is not None else 1
        first = local.nonzero()
        where = f"first at example {int(first[0, 0])} of the batch" if first.numel() else "on another process"
        raise FloatingPointError(
            f"Non-finite log-likelihood at step {step} for member {members} ({where}); stopping before the "
            "optimizer applies it, so the weights keep their last finite values. Check the learning rate and the data."
        )

    def renyi_objective(self, loglik: torch.Tensor, mode: str, per_token: torch.Tensor | None = None) -> RenyiBound:
        """Evaluate the bound for ``loglik`` ``(B, K)`` and log the routing metrics.

        ``per_token`` ``(B,)`` gives the completion tokens of each example, so member NLLs are reported per token;
        without it they are per example.
        """
        self._check_finite(loglik)
        alpha = self.current_alpha()
        bound = renyi_bound(loglik, alpha, self._renyi_log_weights.to(loglik.device))
        self._log_routing(loglik.detach().float(), bound.responsibilities, alpha, mode, per_token)
        return bound

    def _log_routing(self, loglik, responsibilities, alpha, mode, per_token) -> None:
        num = loglik.shape[0]
        tokens = per_token.float().sum() if per_token is not None else torch.tensor(float(num), device=loglik.device)
        stats = torch.cat(
            [
                torch.tensor([float(num)], device=loglik.device),
                routing_entropy(responsibilities).sum().reshape(1),
                loglik.std(dim=-1, unbiased=False).sum().reshape(1),
                tokens.reshape(1).to(loglik.device),
                responsibilities.sum(0),
                -loglik.sum(0),
            ]
        )
        stats = self.accelerator.reduce(stats, reduction="sum")
        count, entropy_sum, std_sum, token_sum = (float(v) for v in stats[:4])
        k = self.num_members
        shares, nll = stats[4 : 4 + k], stats[4 + k : 4 + 2 * k]
        metrics = self._metrics[mode]
        metrics["renyi/alpha"].append(alpha)
        metrics["renyi/routing_entropy"].append(entropy_sum / max(count, 1.0))
        metrics["renyi/loglik_std"].append(std_sum / max(count, 1.0))
        for index, name in enumerate(self.member_names):
            metrics[f"renyi/{name}/share"].append(float(shares[index]) / max(count, 1.0))
            metrics[f"renyi/{name}/nll"].append(float(nll[index]) / max(token_sum, 1.0))

    # ------------------------------------------------------------------ data
    def _prepare_dataset(self, dataset, *args, **kwargs):
        """TRL's dataset preparation, reporting the examples it drops because truncation to ``max_length`` left them
        without a completion token.

        Such an example has no log-likelihood to train on (TRL removes it; were it kept, ℓ_ik would be an empty sum,
        never a NaN). Dropping some is a ``UserWarning`` that counts them; dropping all is a ``ValueError``.
        """
        prepared = super()._prepare_dataset(dataset, *args, **kwargs)
        name = kwargs.get("dataset_name", args[-1] if args and isinstance(args[-1], str) else "train")
        config = kwargs.get("args", next((a for a in args if isinstance(a, TrainingArguments)), None))
        report_dropped_examples(dataset, prepared, config, name)
        return prepared

    # ------------------------------------------------------------------ saving and resuming
    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        write_metadata(
            output_dir, ensemble_metadata(model, self.args.renyi_metadata(), {"trainer": type(self).__name__})
        )

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_member_weights(model, resume_from_checkpoint, self.member_names)
        attach_ensemble(model, self.num_members)
        get_router(model).enabled = True
        return None


def report_dropped_examples(raw, prepared, args, dataset_name: str) -> int:
    """Warn about (or refuse) examples removed by preparation; return how many were dropped.

    Only counted for map-style datasets that were not packed (packing changes the number of rows by design).
    """
    if not (isinstance(raw, Dataset) and isinstance(prepared, Dataset)) or "seq_lengths" in prepared.column_names:
        return 0
    total, kept = len(raw), len(prepared)
    dropped = total - kept
    if dropped <= 0:
        return 0
    max_length = getattr(args, "max_length", None)
    mode = getattr(args, "truncation_mode", "keep_start")
    if kept == 0:
        raise ValueError(
            f"All {total} examples of the {dataset_name} dataset have no completion token left after truncation to "
            f"max_length={max_length} (truncation_mode={mode!r}); raise max_length or shorten the prompts."
        )
    warnings.warn(
        f"{dropped} of {total} examples of the {dataset_name} dataset have no completion token left after truncation "
        f"to max_length={max_length} (truncation_mode={mode!r}) and were excluded from training.",
        UserWarning,
        stacklevel=3,
    )
    return dropped


def sequence_log_likelihood(log_probs: torch.Tensor, labels: torch.Tensor, num_members: int, segments=None):
    """Per-example, per-member completion log-likelihoods from a member-batched fused-head output.

    Args:
        log_probs: ``(K·B, T−1)`` per-token log-probs (0 where the label is -100), rows ``k·B…`` of member k.
        labels: ``(B, T)`` the untiled labels.
        segments: ``(B, T)`` example index of every token for padding-free batches (several examples in one row);
            ``None`` when each row is one example.

    Returns:
        ``(loglik (N, K), num_tokens (N,))`` for the N examples with at least one completion token.
    """
    shifted = labels[:, 1:]
    mask = shifted != -100
    lp = log_probs.float().reshape(num_members, *shifted.shape)
    if segments is None:
        loglik, num_tokens = lp.sum(-1).T, mask.sum(-1).float()
    else:
        seg = segments[:, 1:].reshape(-1).long()
        count = int(seg.max()) + 1 if seg.numel() else 0
        loglik = lp.new_zeros(num_members, count).index_add_(1, seg, lp.reshape(num_members, -1)).T
        num_tokens = lp.new_zeros(count).index_add_(0, seg, mask.reshape(-1).float())
    keep = num_tokens > 0
    if not bool(keep.all()):
        loglik, num_tokens = loglik[keep], num_tokens[keep]
    return loglik, num_tokens


def padding_free_segments(inputs: dict) -> torch.Tensor | None:
    """Example index of every token of a padding-free batch, or ``None`` for padded batches."""
    if "seq_idx" in inputs and inputs["seq_idx"] is not None:
        return inputs["seq_idx"]
    if "position_ids" in inputs and "attention_mask" not in inputs:
        starts = (inputs["position_ids"] == 0).long()
        return starts.reshape(-1).cumsum(0).reshape(starts.shape) - 1
    return None

