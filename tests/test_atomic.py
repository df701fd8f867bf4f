"""Atomic folder replacement (:mod:`trl_renyi.atomic`), shared by checkpoints and ensemble saves."""

import pytest

from trl_renyi import atomic


def make(folder, **files):
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_folder_puts_the_new_folder_in_place_and_removes_the_old(tmp_path, monkeypatch, exchange):
    if not exchange:  # a system without an exchanging rename: two renames
        monkeypatch.setattr(atomic, "_exchange", lambda first, second: False)
    target = make(tmp_path / "target", a="old", stale="old")
    staged = make(tmp_path / ".staged", a="new")
    atomic.replace_folder(staged, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]
    assert sorted(p.name for p in target.iterdir()) == ["a"] and (target / "a").read_text() == "new"


def test_replace_folder_onto_a_missing_or_empty_target(tmp_path):
    atomic.replace_folder(make(tmp_path / "one", a="1"), tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    atomic.replace_folder(make(tmp_path / "two", b="2"), tmp_path / "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "missing"]
    assert (tmp_path / "missing" / "a").read_text() == "1" and (tmp_path / "empty" / "b").read_text() == "2"


def test_the_exchange_is_one_system_call_where_the_os_has_it(tmp_path):
    first, second = make(tmp_path / "first", a="1"), make(tmp_path / "second", b="2")
    if not atomic._exchange(first, second):
        pytest.skip("no exchanging rename on this system")
    assert (first / "b").read_text() == "2" and (second / "a").read_text() == "1"
