"""K LoRA members on one frozen base model: building, attaching and initialising them.

The ensemble is one :class:`peft.PeftModel` holding K adapters named ``member_0 … member_{K-1}``; PEFT's own
storage is the single source of truth (saving, checkpoints, ``disable_adapter()`` and the Hub layout stay standard).
Every adapted ``Linear`` is a :class:`~trl_renyi.model.layer.MemberBatchedLinear` (on a bitsandbytes 4-bit or 8-bit
base, its QLoRA counterpart from :mod:`trl_renyi.model.quantized`), which PEFT creates itself from a registered
config; the layers share one :class:`~trl_renyi.model.layer.MemberRouter` (routing is opt-in, see
:func:`~trl_renyi.model.layer.member_routing`).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import PeftType
from transformers.pytorch_utils import Conv1D

from trl_renyi.compat import peft_wraps_moe_parameters, register_member_layer
from trl_renyi.model.layer import (
    MEMBER_PREFIX,
    MemberBatchedLayer,
    MemberBatchedLinear,
    MemberRouter,
    member_layers,
    member_names,
)
from trl_renyi.model.quantized import peft_quantized_layers, quantized_member_layers
from trl_renyi.objective import check_num_members

logger = logging.getLogger(__name__)


def _device_indices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def check_members_servable(model: PeftModel, names: Sequence[str]) -> None:
    """Raise ``ValueError`` unless every member is a plain LoRA adapter on ``Linear`` layers with one shared shape."""
    missing = [n for n in names if n not in model.peft_config]
    if missing:
        raise ValueError(
            f"The PeftModel lacks the ensemble adapters {missing}; it holds {sorted(model.peft_config)}. "
            f"Members must be named {MEMBER_PREFIX}0 … {MEMBER_PREFIX}{len(names) - 1} (see `num_members`)."
        )
    reference = None
    for n in names:
        cfg = model.peft_config[n]
        if cfg.peft_type != PeftType.LORA:
            raise ValueError(f"Adapter {n!r} is {cfg.peft_type.value}; the member-batched forward serves LoRA only.")
        if getattr(cfg, "use_dora", False):
            raise ValueError(f"Adapter {n!r} uses DoRA, which the member-batched forward cannot serve.")
        if getattr(cfg, "lora_bias", False):
            raise ValueError(f"Adapter {n!r} sets lora_bias, which the member-batched forward cannot serve.")
        if cfg.modules_to_save or getattr(cfg, "trainable_token_indices", None):
            raise ValueError(
                f"Adapter {n!r} trains full modules (modules_to_save / trainable_token_indices); ensemble members "
                "must be LoRA deltas only, since a copied module cannot be member-batched."
            )
        shape = (
            cfg.r,
            cfg.lora_alpha,
            sorted(cfg.target_modules) if isinstance(cfg.target_modules, set) else cfg.target_modules,
        )
        if reference is None:
            reference = (n, shape)
        elif shape != reference[1]:
            raise ValueError(
                f"Members {reference[0]!r} and {n!r} have different LoRA configs (r, lora_alpha, target_modules): "
                f"{reference[1]} vs {shape}; all members must share one LoraConfig."
            )
    member_set = set(names)
    for module_name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        held = member_set.intersection(getattr(module, "lora_A", {}) or {})
        held |= member_set.intersection(getattr(module, "lora_embedding_A", {}) or {})
        held |= member_set.intersection(getattr(module, "modules_to_save", {}) or {})
        if not held:
            continue
        if not isinstance(module, servable_lora_types()) or not isinstance(module, LoraLayer):
            working = linear_target_names(model.get_base_model())
            base = module.get_base_layer()
            raise ValueError(
                f"Layer {module_name!r} ({type(module).__name__} over {type(base).__name__}) holds members "
                f"{sorted(held)} but is not a LoRA Linear layer; the member-batched forward serves LoRA on "
                "torch.nn.Linear (and Conv1D) modules and on bitsandbytes Linear4bit / Linear8bitLt bases only "
                f"(not target_parameters, fused MoE experts or routers, nor other quantised layers). Targets that work "
                f"here: target_modules={working}."
            )
        if held != member_set:
            raise ValueError(f"Layer {module_name!r} holds only members {sorted(held)}; every member must adapt it.")
        variants = member_set.intersection(module.lora_variant)
        if variants:
            raise ValueError(f"Layer {module_name!r} uses a LoRA variant (e.g. DoRA) for {sorted(variants)}.")


def set_members_trainable(model: PeftModel, names: Sequence[str], trainable: bool = True) -> None:
    """Make every member's LoRA weights (not only PEFT's single active adapter) trainable."""
    model.set_requires_grad(list(names), requires_grad=trainable)
    for n in names:
        model.peft_config[n].inference_mode = not trainable


def perturb_lora_b(model: PeftModel, names: Sequence[str], std: float, seed: int) -> None:
    """Draw each member's LoRA ``B`` from N(0, std²) with its own seed (``std = 0`` keeps PEFT's B = 0).

    With B = 0 every member equals the base model, the responsibilities are uniform and on conflicting data the
    members' gradients cancel: a saddle only noise escapes. A small random B makes members functionally distinct.
    """
    if std <= 0:
        return
    for k, n in enumerate(names):
        generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + k)
        for module in model.modules():
            if isinstance(module, servable_lora_types()) and n in module.lora_B:
                weight = module.lora_B[n].weight
                noise = torch.randn(weight.shape, generator=generator, dtype=torch.float32) * std
                with torch.no_grad():
                    weight.copy_(noise.to(device=weight.device, dtype=weight.dtype))


def build_ensemble(
    model: torch.nn.Module,
    lora_config: LoraConfig,
    num_members: int,
    seed: int = 0,
    init_std: float = 0.0,
) -> PeftModel:
    """Wrap ``model`` in a PeftModel with ``num_members`` LoRA adapters built from one ``lora_config``.

    Member 0 is created by ``get_peft_model`` from the caller's RNG state, exactly as TRL creates its single adapter
    (so K = 1 is bit-identical to TRL); member k ≥ 1 draws its LoRA ``A`` under seed ``seed + k``; with K ≥ 2 and
    ``init_std > 0`` every member gets its own random ``B`` (a single member has no symmetry to break, so K = 1 keeps
    PEFT's B = 0 whatever ``init_std``). All members are trainable and the member-batched forward is installed.
    """
    if not isinstance(lora_config, LoraConfig):
        raise ValueError(
            f"peft_config must be a peft.LoraConfig for an ensemble of LoRA members, got {type(lora_config).__name__}."
        )
    check_num_members(num_members)
    names = member_names(num_members)
    lora_config = resolve_moe_all_linear(model, lora_config)
    with warnings.catch_warnings():
        # PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing`; nothing a user can change
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model = get_peft_model(model, member_lora_config(lora_config), adapter_name=names[0])
    for k, name in enumerate(names[1:], start=1):
        with torch.random.fork_rng(devices=_device_indices()):
            torch.manual_seed(seed + k)
            peft_model.add_adapter(name, member_lora_config(lora_config))
    if num_members > 1:
        perturb_lora_b(peft_model, names, init_std, seed)
    set_members_trainable(peft_model, names)
    install_member_layers(peft_model, names)
    return peft_model


def attach_ensemble(model: PeftModel, num_members: int) -> PeftModel:
    """Validate a PeftModel that already holds ``member_*`` adapters, make them all trainable and install routing."""
    names = member_names(num_members)
    extra = sorted(n for n in model.peft_config if n.startswith(MEMBER_PREFIX) and n not in names)
    if extra:
        raise ValueError(
            f"num_members={num_members} but the PeftModel also holds {extra}; set num_members to the number of "
            "member adapters."
        )
    check_members_servable(model, names)
    set_members_trainable(model, names)
    install_member_layers(model, names)
    return model


def linear_target_names(model: torch.nn.Module, full: bool = False) -> list[str]:
    """Names of the ``nn.Linear`` / ``Conv1D`` layers of ``model`` other than its output head: their last component
    (as users write ``target_modules``), or with ``full`` their whole module paths (as PEFT's ``all-linear`` does)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found, inside_tuner = set(), []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in inside_tuner):
            continue
        layer = module
        if isinstance(module, BaseTunerLayer):  # already adapted: judge the wrapped layer, skip the adapter parts
            inside_tuner.append(name)
            layer = module.get_base_layer()
        if isinstance(layer, (torch.nn.Linear, Conv1D)) and module is not head and layer is not head:
            found.add(name if full else name.rsplit(".", 1)[-1])
    return sorted(found)


def resolve_moe_all_linear(model: torch.nn.Module, lora_config: LoraConfig) -> LoraConfig:
    """``target_modules="all-linear"`` on a Mixture-of-Experts model: the members adapt every ``nn.Linear`` layer.

    For MoE models with fused expert weights PEFT's ``all-linear`` also wraps the router (and, with
    ``target_parameters``, the experts) in ``ParamWrapper`` layers, which adapt a parameter rather than a linear
    map and cannot be batched over members. Here ``all-linear`` is resolved to the model's linear layers (attention,
    shared experts, ...), and a warning names what stays frozen; other models and explicit targets are unchanged.
    """
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    is_moe = any(getattr(text_config, key, None) for key in ("num_experts", "num_local_experts", "n_routed_experts"))
    if lora_config.target_modules != "all-linear" or not is_moe:
        return lora_config
    names = linear_target_names(model)
    resolved = copy.deepcopy(lora_config)
    resolved.target_modules = set(linear_target_names(model, full=True))
    if not peft_wraps_moe_parameters(getattr(text_config, "model_type", "")):
        return resolved  # the same layers PEFT's all-linear picks
    frozen = sorted(
        {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
         if name and not isinstance(module, (torch.nn.Linear, Conv1D)) and any(
             isinstance(p, torch.nn.Parameter) for p in module.parameters(recurse=False))
         and module is not model.get_input_embeddings() and "norm" not in name.rsplit(".", 1)[-1]}
    )  # fmt: skip
    logger.warning(
        "target_modules='all-linear' on the Mixture-of-Experts model %s: the members adapt its linear layers %s; "
        "the fused experts and routers (%s), which PEFT adapts only through parameter wrappers that cannot be "
        "batched over members, stay frozen. Pass target_modules explicitly to choose.",
        type(model).__name__, names, ", ".join(frozen) or "none",
    )  # fmt: skip
    return resolved


def member_lora_config(lora_config: LoraConfig) -> LoraConfig:
    """A copy of ``lora_config`` under which PEFT creates :class:`MemberBatchedLinear` layers."""
    config = copy.deepcopy(lora_config)
    register_member_layer(config, MemberBatchedLinear, quantized=quantized_member_layers())
    return config


def install_member_layers(model: PeftModel, names: Sequence[str]) -> MemberRouter:
    """Give every member layer of ``model`` one shared :class:`MemberRouter` and return it (idempotent).

    Layers that PEFT created without the registered config (a PeftModel built or loaded elsewhere) are stock LoRA
    ``Linear`` layers (or PEFT's QLoRA layers over a bitsandbytes base); they are promoted to
    :class:`MemberBatchedLinear` (or its quantised counterpart), which adds no parameter or buffer, so the state dict
    and PEFT's behaviour outside routing are unchanged.
    """
    check_members_servable(model, names)
    router = getattr(model, "member_router", None)
    if router is None:
        router = MemberRouter(names)
        model.member_router = router
    router.member_names = list(names)
    promote = {LoraLinear: MemberBatchedLinear, **peft_quantized_layers()}
    for module in model.modules():
        if isinstance(module, servable_lora_types()) and names[0] in module.lora_A:
            if type(module) in promote:
                module.__class__ = promote[type(module)]
            module.member_router = router
    return router


def servable_lora_types() -> tuple[type, ...]:
    """The PEFT LoRA layer classes a member layer can serve: LoRA ``Linear`` and, with bitsandbytes, PEFT's QLoRA
    ``Linear4bit`` / ``Linear8bitLt``."""
    return (LoraLinear, MemberBatchedLayer, *peft_quantized_layers())


def detach_member_layers(model: PeftModel) -> None:
    """Remove the router from ``model`` and its layers (and the shared trunk's hooks): stock PEFT again."""
    router = getattr(model, "member_router", None)
    if router is None:
        return
    for handle in router.trunk_handles:
        handle.remove()
    for module in member_layers(model):
        module.member_router = None
    del model.member_router


def tile_rows(value, rows: int, copies: int):
    """``value`` repeated ``copies`` times along its first dimension when that is the batch's ``rows`` (tuples, e.g.
    rotary position embeddings, element by element); anything else unchanged. Block k of the result is copy k."""
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows:
        return value.repeat(copies, *([1] * (value.dim() - 1)))
    if isinstance(value, tuple):
        return tuple(tile_rows(v, rows, copies) for v in value)
    return value


def tile_for_members(batch: dict, num_members: int) -> dict:
    """Tile a model-input batch K times along the rows: rows ``k·B … (k+1)·B − 1`` are member k's.

    Tensors whose first dimension is the batch size are repeated (:func:`tile_rows`); the flattened-sequence
    boundaries of padding-free batches (``cu_seq_lens_q/k``) are offset for each copy; scalars are kept. The batch size
    is that of ``input_ids`` (or of the first tensor when there is none).
    """
    if num_members == 1:
        return dict(batch)
    first = batch["input_ids"] if "input_ids" in batch else next(v for v in batch.values() if isinstance(v, torch.Tensor))
    rows, total = first.shape[0], first.numel()
    out = {}
    for key, value in batch.items():
        if key in ("cu_seq_lens_q", "cu_seq_lens_k") and isinstance(value, torch.Tensor):
            starts = value[:-1]
            out[key] = torch.cat(
                [starts + k * total for k in range(num_members)] + [value[-1:] + (num_members - 1) * total]
            )
        else:
            out[key] = tile_rows(value, rows, num_members)
    return out


def register_members_with_zero3(model: PeftModel, names: list[str], register=None) -> int:
    """Declare every member's LoRA ``A`` and ``B`` as external parameters of the LoRA layer that reads them.

    The member-batched forward reads all members' ``lora_A[name].weight`` / ``lora_B[name].weight`` inside the LoRA
    layer's own forward instead of calling those sub-modules, so DeepSpeed ZeRO-3 (which gathers a module's own
    parameters around its call) would hand it empty shards. Registered with
    ``deepspeed.zero.register_external_parameter``, they are gathered and released with the layer. Returns the number
    of parameters registered.
    """
    if register is None:
        from deepspeed.zero import register_external_parameter as register
    count = 0
    for module in model.modules():
        if not isinstance(module, MemberBatchedLayer):
            continue
        for name in names:
            for container in (module.lora_A, module.lora_B):
                register(module, container[name].weight)
                count += 1
    return count
