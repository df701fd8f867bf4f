"""The private internals trl_renyi relies on exist in the installed TRL / transformers / PEFT."""

from trl_renyi import compat


def test_every_expected_internal_is_present():
    problems = compat.check_internals()
    assert not problems, "\n".join(problems)


def test_a_missing_internal_is_reported_by_name(monkeypatch):
    monkeypatch.setattr(compat, "EXPECTED_INTERNALS", [("peft", "peft.LoraConfig._no_such_internal")])
    (message,) = compat.check_internals()
    assert "peft no longer provides peft.LoraConfig._no_such_internal" in message and "0.21" in message
