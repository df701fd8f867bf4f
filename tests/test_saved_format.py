"""Damaged or missing ensemble files are refused with the member and the path named, before any weight loads."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import lora_config
from trl_renyi import RenyiEnsemble, build_ensemble


@pytest.fixture
def saved(tmp_path, tokenizer, make_model):
    folder = tmp_path / "ensemble"
    RenyiEnsemble(build_ensemble(make_model(), lora_config(), 2, seed=0, init_std=0.05), tokenizer).save_pretrained(folder)
    return folder


def test_truncated_member_file_is_named(saved, tokenizer, make_model):
    weights = saved / "member_1" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"Member member_1: .*member_1/adapter_model.safetensors is not a readable"):
        RenyiEnsemble.from_pretrained(saved, base_model=make_model(), tokenizer=tokenizer)


def test_corrupt_header_is_named(saved, tokenizer, make_model):
    weights = saved / "member_0" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:20] = b"\xff" * 12
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="Member member_0: .*not a readable safetensors file"):
        RenyiEnsemble.from_pretrained(saved, base_model=make_model(), tokenizer=tokenizer)


def test_nan_weights_are_refused(saved, tokenizer, make_model):
    weights = saved / "member_1" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=rf"Member member_1: .* NaN or infinite weights in '{key}'"):
        RenyiEnsemble.from_pretrained(saved, base_model=make_model(), tokenizer=tokenizer)


def test_missing_folder_is_reported_as_a_folder_with_a_suggestion(saved):
    with pytest.raises(FileNotFoundError, match=r"Ensemble folder '.*ensembel' does not exist\. Did you mean '.*ensemble'"):
        RenyiEnsemble.from_pretrained(saved.parent / "ensembel")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RenyiEnsemble.from_pretrained("path/that/does-not-exist/really")


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match=r"no local folder, and the Hub repository 'someone/some-ensemble'"):
        RenyiEnsemble.from_pretrained("someone/some-ensemble")


def test_an_unrelated_file_with_the_same_suffix_is_not_suggested(tmp_path):
    from trl_renyi.paths import did_you_mean

    (tmp_path / "dpo_sft.jsonl").write_text("")
    (tmp_path / "train.jsonl").write_text("")
    assert did_you_mean(tmp_path / "nonexistent.jsonl") == ""
    assert did_you_mean(tmp_path / "trian.jsonl") == f" Did you mean {str(tmp_path / 'train.jsonl')!r}?"
    assert did_you_mean(tmp_path / "train", folders_only=True) == ""  # a file is no ensemble folder


@pytest.mark.parametrize("part", ["member_1", "renyi_ensemble.json"])
def test_a_folder_mixing_two_saves_is_refused_by_name(tmp_path, tokenizer, make_model, part):
    """One part copied in from another save of the same layout: the save ids disagree."""
    import shutil

    from trl_renyi.model.saved_format import load_member_weights

    first, second = tmp_path / "first", tmp_path / "second"
    for folder, seed in ((first, 0), (second, 1)):
        model = build_ensemble(make_model(), lora_config(), 2, seed=seed, init_std=0.05)
        RenyiEnsemble(model, tokenizer).save_pretrained(folder)
    if part == "member_1":
        shutil.rmtree(first / part)
        shutil.copytree(second / part, first / part)
    else:
        shutil.copy2(second / part, first / part)
    match = r"first mixes two saves: .*first/member_\d/adapter_model\.safetensors was written by save \w+ but .*first/renyi_ensemble\.json by save \w+"
    with pytest.raises(ValueError, match=match):
        RenyiEnsemble.from_pretrained(first, base_model=make_model(), tokenizer=tokenizer)
    model = build_ensemble(make_model(), lora_config(), 2, seed=2, init_std=0.05)
    with pytest.raises(ValueError, match=match):  # resuming from such a checkpoint too
        load_member_weights(model, first, ["member_0", "member_1"])
