"""A one-time safetensors copy of the embedded GGUF model, so that every later load takes seconds.

Dequantising ``SmolLM2-135M-Instruct.Q4_1.gguf`` takes 15–40 s on every load. The first load converts it once into
``<cache>/embedded/<gguf stem>-<sha256 prefix>/`` (``config.json``, ``model.safetensors``, tokenizer files), where
``<cache>`` is ``$TRL_RENYI_CACHE``, else ``$HF_HOME/trl_renyi``, else ``$XDG_CACHE_HOME/trl_renyi``, else
``~/.cache/trl_renyi``. The folder is written under a temporary name and renamed into place with one ``os.replace``
once complete (a ``COMPLETE`` file inside records the GGUF's checksum), so an interrupted conversion never leaves a
folder that is used: the next load converts again. A different GGUF (another checksum) gets its own folder.
``TRL_RENYI_NO_MODEL_CACHE=1`` always loads the GGUF directly.

The converted copy is also placed where the Hugging Face cache looks for the original model's Hub id
(:func:`place_in_hub_cache`: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, in huggingface_hub's layout
``models--org--name/snapshots/<revision>/`` with ``refs/main``), so that every tool that loads the base model by its
Hub id — ``AutoModelForCausalLM``, ``AutoTokenizer``, ``AutoPeftModelForCausalLM`` on a saved member — finds it
offline. The files are hard links to the converted copy where the file system allows (copies otherwise). A Hub cache
that already holds the model (a real download) is left as it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from huggingface_hub import constants

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"


def cache_root() -> Path:
    """Where converted models are kept (see the module docstring for the order of the variables)."""
    if os.environ.get("TRL_RENYI_CACHE"):
        return Path(os.environ["TRL_RENYI_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "trl_renyi"
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "trl_renyi"
    return Path.home() / ".cache" / "trl_renyi"


def cache_enabled() -> bool:
    return os.environ.get("TRL_RENYI_NO_MODEL_CACHE", "").lower() not in ("1", "true", "yes")


_CHECKSUMS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path, chunk: int = 8 * 2**20) -> str:
    """SHA-256 of a file (remembered per path, size and modification time within the process)."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _CHECKSUMS:
        return _CHECKSUMS[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    _CHECKSUMS[key] = digest.hexdigest()
    return _CHECKSUMS[key]


def cached_folder(gguf_path: Path) -> tuple[Path, str]:
    """``(folder, checksum)`` of the converted copy of ``gguf_path`` (which may not exist yet)."""
    checksum = file_sha256(gguf_path)
    return cache_root() / "embedded" / f"{gguf_path.stem}-{checksum[:16]}", checksum


def is_complete(folder: Path, checksum: str) -> bool:
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("gguf_sha256") == checksum
    except (OSError, json.JSONDecodeError):
        return False


def _progress(message: str) -> None:
    print(f"[trl_renyi] {message}", file=sys.stderr, flush=True)


def convert(gguf_path: Path, folder: Path, checksum: str, load_from_gguf) -> Path:
    """Convert ``gguf_path`` with ``load_from_gguf() -> (model, tokenizer)`` and publish ``folder`` atomically."""
    staging = folder.with_name(f".staging-{folder.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    start = time.perf_counter()
    _progress(f"Converting {gguf_path.name} to safetensors once (about half a minute); later loads use {folder}.")
    try:
        model, tokenizer = load_from_gguf()
        _progress(f"Dequantised in {time.perf_counter() - start:.0f} s; writing safetensors ...")
        staging.mkdir(parents=True)
        model.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        (staging / COMPLETE_MARKER).write_text(json.dumps({"gguf": gguf_path.name, "gguf_sha256": checksum}) + "\n")
        try:
            os.replace(staging, folder)
        except OSError:
            if not is_complete(folder, checksum):  # not another process's finished copy: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _progress(f"Cached in {time.perf_counter() - start:.0f} s.")
    return folder


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache in force (``HF_HUB_CACHE``, else ``HF_HOME/hub``, as huggingface_hub resolves it)."""
    return Path(constants.HF_HUB_CACHE).expanduser()


def place_in_hub_cache(folder: Path, repo_id: str, revision: str) -> Path:
    """Make ``folder`` (a complete converted model) the ``main`` revision of model ``repo_id`` in the Hub cache.

    Writes ``models--org--name/snapshots/<revision>/`` (under a temporary name, renamed into place once complete) and
    then ``refs/main``; returns the snapshot folder. Nothing is changed when ``refs/main`` already names another
    snapshot that exists (the model was downloaded from the Hub).
    """
    repo = hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    current = ref.read_text().strip() if ref.is_file() else None
    if current and (repo / "snapshots" / current).is_dir():
        return repo / "snapshots" / current
    snapshot = repo / "snapshots" / revision
    if not snapshot.is_dir():
        staging = snapshot.with_name(f".staging-{revision}-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            for source in folder.iterdir():
                if source.is_file() and source.name != COMPLETE_MARKER:
                    try:
                        os.link(source, staging / source.name)
                    except OSError:  # another file system, or links not allowed
                        shutil.copy2(source, staging / source.name)
            try:
                os.replace(staging, snapshot)
            except OSError:
                if not snapshot.is_dir():  # not another process's finished copy: a real failure
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    ref.parent.mkdir(parents=True, exist_ok=True)
    pending = ref.with_name(f".main-{os.getpid()}")
    pending.write_text(revision)
    os.replace(pending, ref)
    return snapshot
