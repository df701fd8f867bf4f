"""Single models with the ensemble's inference API, as baselines: the bare base model or one plain LoRA adapter.

A single model is a one-member ensemble with π = (1,): :meth:`score`, :meth:`predict_choices` and :meth:`generate`
work unchanged, its probabilities are its own and its mutual information is 0 — exactly what an evaluation needs to
put an ensemble next to its baselines.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from peft import PeftModel

from trl_renyi.compat import quiet_checkpointing_alias
from trl_renyi.inference.ensemble import EnsembleScorer, RenyiEnsemble
from trl_renyi.model.layer import base_model_only
from trl_renyi.model.loading import (
    embedded_alias_of_hub_id,
    load_causal_lm,
    load_tokenizer,
)


class SingleModel(EnsembleScorer):
    """One causal LM served through the ensemble interface (K = 1).

    Args:
        model: a ``PreTrainedModel`` or a ``PeftModel`` with one active adapter.
        tokenizer: its tokenizer.
        name: the name reported for this model (its single "member").
        forward_context: a callable returning a context manager entered around every forward (e.g. the ensemble's
            base-only mode).
        use_chat_template: render plain-string prompts with the chat template (``None``: when the tokenizer has one).
    """

    def __init__(self, model, tokenizer=None, name: str = "model", forward_context=None, use_chat_template=None):
        super().__init__(
            model, tokenizer, [name], alpha=1.0, metadata={"name": name}, use_chat_template=use_chat_template
        )
        self._forward_context = forward_context or contextlib.nullcontext

    @torch.no_grad()
    def member_forward(self, batch: dict[str, torch.Tensor], **model_kwargs):
        """The model's output for ``batch`` with ``logits`` shaped ``(1, B, T', V)``."""
        device = self.device
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        with self._forward_context():
            outputs = self.model(**inputs, **model_kwargs)
        outputs.logits = outputs.logits.unsqueeze(0)
        return outputs

    @classmethod
    def base_of(cls, ensemble: RenyiEnsemble) -> SingleModel:
        """The ensemble's own frozen base model (shares its weights; no adapter is touched)."""
        model = ensemble.model
        return cls(
            model,
            ensemble.tokenizer,
            name="base",
            forward_context=lambda: base_model_only(model),
            use_chat_template=ensemble.use_chat_template,
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        base_model=None,
        tokenizer=None,
        name: str | None = None,
        dtype: str | torch.dtype = "float32",
        trust_remote_code: bool = False,
        use_chat_template: bool | None = None,
    ) -> SingleModel:
        """Load a plain model (folder, Hub id or embedded alias) or a PEFT adapter folder on its base model.

        Args:
            path: a model, or a folder holding ``adapter_config.json`` (e.g. ``ensemble_dir/member_0``).
            base_model: for an adapter, the base model (loaded model or name); by default the one its config records.
            tokenizer: defaults to the tokenizer saved with the adapter (or its parent folder), else the base model's.
            name: the name reported for this model; defaults to the folder name.
            use_chat_template: render plain-string prompts with the chat template (``None``: when the tokenizer has
                one).
        """
        folder = Path(path)
        config_path = folder / "adapter_config.json"
        if not config_path.is_file():
            model = load_causal_lm(str(path), dtype=dtype, trust_remote_code=trust_remote_code)
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(str(path))
            return cls(model.eval(), tokenizer, name=name or folder.name or str(path), use_chat_template=use_chat_template)
        try:
            recorded = json.loads(config_path.read_text()).get("base_model_name_or_path") or ""
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_path} is not valid JSON ({err}).") from None
        if base_model is None:
            if not recorded:
                raise ValueError(f"{config_path} records no base_model_name_or_path: pass `base_model`.")
            base_model = embedded_alias_of_hub_id(recorded) or recorded  # an embedded model's original: its copy
        base_name = base_model if isinstance(base_model, str) else ""
        if isinstance(base_model, str):
            base_model = load_causal_lm(base_model, dtype=dtype, trust_remote_code=trust_remote_code)
        if tokenizer is None:
            for candidate in (folder, folder.parent):
                if (candidate / "tokenizer_config.json").is_file():
                    tokenizer = load_tokenizer(str(candidate))
                    break
            else:
                if base_name or recorded:
                    tokenizer = load_tokenizer(base_name or recorded)
        with quiet_checkpointing_alias():  # PEFT reads transformers' deprecated alias
            model = PeftModel.from_pretrained(base_model, str(folder))
        return cls(model.eval(), tokenizer, name=name or folder.name, use_chat_template=use_chat_template)

    def save_pretrained(self, *args, **kwargs):
        raise TypeError("A SingleModel is a read-only baseline; save the underlying model itself.")

    def push_to_hub(self, *args, **kwargs):
        raise TypeError("A SingleModel is a read-only baseline; push the underlying model itself.")
