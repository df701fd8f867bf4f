"""The one save path (:mod:`trl_renyi.model.saving`): a save killed at any point leaves the complete old or the complete
new ensemble, member folders of the old one are gone, run files are kept, foreign files are refused by name."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.saving_script import KILL_POINTS, tiny_ensemble
from trl_renyi import RenyiEnsemble
from trl_renyi.model.saved_format import FILES_FIELD, SAVE_ID_FIELD, member_save_id, read_metadata
from trl_renyi.model.saving import save_ensemble

SCRIPT = Path(__file__).parent / "saving_script.py"


def member_weights(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(str(p / "adapter_model.safetensors")) for p in sorted(folder.glob("member_*"))}


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].keys() == expected[name].keys()
        for key in expected[name]:
            torch.testing.assert_close(actual[name][key], expected[name][key], rtol=0, atol=0)


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_save_killed_at_any_point_leaves_the_old_or_the_new_ensemble(tmp_path, point):
    folder, reference = tmp_path / "ensemble", tmp_path / "reference"
    old, base = tiny_ensemble(num_members=3, seed=1)
    old.save_pretrained(folder)
    (folder / "checkpoint-7").mkdir()  # a run file, kept by every save
    (folder / "checkpoint-7" / "trainer_state.json").write_text("{}")
    old_weights = member_weights(folder)
    new, _ = tiny_ensemble(num_members=2, seed=2)
    new.save_pretrained(reference)
    new_weights = member_weights(reference)

    command = [sys.executable, str(SCRIPT), str(folder), "--members", "2", "--seed", "2", "--kill-at", point]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]

    swapped = point == "after_rename"
    loaded = RenyiEnsemble.from_pretrained(folder, base_model=base())  # refuses any mix of two saves
    assert loaded.num_members == (2 if swapped else 3)
    assert_same_weights(member_weights(folder), new_weights if swapped else old_weights)
    assert (folder / "checkpoint-7" / "trainer_state.json").read_text() == "{}"
    assert not (swapped and (folder / "member_2").exists())

    # the next save into the folder removes what the killed one left beside it
    new.save_pretrained(folder)
    assert siblings(folder) == ["reference"]
    assert_same_weights(member_weights(folder), new_weights)
    assert sorted(os.listdir(folder / "checkpoint-7")) == ["trainer_state.json"]


def test_every_part_records_the_save_and_the_files_it_wrote(tmp_path):
    ensemble, _ = tiny_ensemble(num_members=2, seed=0)
    ensemble.save_pretrained(tmp_path / "saved")
    meta = read_metadata(tmp_path / "saved")
    assert len(meta[SAVE_ID_FIELD]) == 32
    assert {member_save_id(tmp_path / "saved" / n / "adapter_model.safetensors") for n in ("member_0", "member_1")} == {
        meta[SAVE_ID_FIELD]
    }
    assert {"member_0", "member_1", "renyi_ensemble.json", "README.md", "tokenizer.json"} <= set(meta[FILES_FIELD])
    assert set(meta[FILES_FIELD]) == set(os.listdir(tmp_path / "saved"))
    ensemble.save_pretrained(tmp_path / "saved")
    assert read_metadata(tmp_path / "saved")[SAVE_ID_FIELD] != meta[SAVE_ID_FIELD]


def test_fewer_members_replace_the_old_ones_and_run_files_stay(tmp_path):
    folder = tmp_path / "run"
    old, base = tiny_ensemble(num_members=4, seed=1)
    old.save_pretrained(folder)
    for run_file in ("checkpoint-2/optimizer.pt", "runs/events.out", "trainer_state.json", "all_results.json"):
        (folder / run_file).parent.mkdir(parents=True, exist_ok=True)
        (folder / run_file).write_text(run_file)
    new, _ = tiny_ensemble(num_members=2, seed=2)
    new.save_pretrained(folder)
    assert sorted(p.name for p in folder.glob("member_*")) == ["member_0", "member_1"]
    for run_file in ("checkpoint-2/optimizer.pt", "runs/events.out", "trainer_state.json", "all_results.json"):
        assert (folder / run_file).read_text() == run_file
    assert RenyiEnsemble.from_pretrained(folder, base_model=base()).num_members == 2
    assert siblings(folder) == []


def test_a_folder_with_foreign_files_is_refused_by_name_and_left_alone(tmp_path):
    folder = tmp_path / "other-model"
    folder.mkdir()
    (folder / "model.safetensors").write_text("not ours")
    (folder / "config.json").write_text("{}")
    ensemble, _ = tiny_ensemble(num_members=2, seed=0)
    with pytest.raises(FileExistsError, match=r"other-model holds \['config\.json', 'model\.safetensors'\], which trl_renyi"):
        ensemble.save_pretrained(folder)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"] and siblings(folder) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="file is a file"):
        ensemble.save_pretrained(tmp_path / "file")


def test_a_failing_save_leaves_the_old_ensemble_and_nothing_beside_it(tmp_path):
    folder = tmp_path / "ensemble"
    old, base = tiny_ensemble(num_members=2, seed=1)
    old.save_pretrained(folder)
    before = member_weights(folder)

    def failing(staged):
        raise OSError("No space left on device (simulated)")

    with pytest.raises(OSError, match="simulated"):
        save_ensemble(folder, old.model, read_metadata(folder), write_model=failing)
    assert_same_weights(member_weights(folder), before)
    assert siblings(folder) == []
    RenyiEnsemble.from_pretrained(folder, base_model=base())


def test_an_ensemble_saved_before_files_were_listed_is_replaced(tmp_path):
    """A folder written before saves recorded their files: its ensemble files are known by name."""
    import json

    folder = tmp_path / "legacy"
    old, base = tiny_ensemble(num_members=3, seed=1)
    old.save_pretrained(folder)
    meta = json.loads((folder / "renyi_ensemble.json").read_text())
    del meta[FILES_FIELD]
    (folder / "renyi_ensemble.json").write_text(json.dumps(meta))
    new, _ = tiny_ensemble(num_members=2, seed=2)
    new.save_pretrained(folder)
    assert not (folder / "member_2").exists()
    assert RenyiEnsemble.from_pretrained(folder, base_model=base()).num_members == 2


def test_what_the_library_left_behind_is_not_foreign(tmp_path):
    """A half-rendered card and a damaged renyi_ensemble.json are the library's own: the next save replaces them."""
    folder = tmp_path / "ensemble"
    old, base = tiny_ensemble(num_members=2, seed=1)
    old.save_pretrained(folder)
    (folder / ".README.md.tmp").write_text("half a card")
    (folder / "renyi_ensemble.json").write_text('{"num_members": 2, "alph')
    new, _ = tiny_ensemble(num_members=2, seed=2)
    new.save_pretrained(folder)
    assert not (folder / ".README.md.tmp").exists()
    RenyiEnsemble.from_pretrained(folder, base_model=base())
