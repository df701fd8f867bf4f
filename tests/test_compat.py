"""The private internals trl_renyi relies on exist in the installed TRL / transformers / PEFT."""

from trl_renyi import compat


def test_every_expected_internal_is_present():
    problems = compat.check_internals()
    assert not problems, "\n".join(problems)


def test_a_missing_internal_is_reported_by_name(monkeypatch):
    monkeypatch.setattr(compat, "EXPECTED_INTERNALS", [("peft", "peft.LoraConfig._no_such_internal")])
    (message,) = compat.check_internals()
    assert "peft no longer provides peft.LoraConfig._no_such_internal" in message and "0.21" in message


def test_instance_attributes_are_found_in_the_class_source(monkeypatch):
    monkeypatch.setattr(
        compat,
        "EXPECTED_INTERNALS",
        [("trl", "trl.SFTTrainer._total_train_tokens"), ("trl", "trl.SFTTrainer._no_such_counter")],
    )
    (message,) = compat.check_internals()
    assert "trl no longer provides trl.SFTTrainer._no_such_counter" in message


def test_every_private_name_of_a_trainer_override_is_expected():
    listed = {path.rsplit(".", 1)[-1] for _, path in compat.EXPECTED_INTERNALS}
    from trl_renyi.training.dpo import RenyiDPOTrainer
    from trl_renyi.training.sft import RenyiSFTTrainer

    for trainer in (RenyiSFTTrainer, RenyiDPOTrainer):
        foreign = {
            name
            for base in trainer.__mro__
            if base.__module__.split(".")[0] in ("trl", "transformers")
            for name in vars(base)
            if name.startswith("_") and not name.startswith("__")
        }
        overridden = {
            name
            for base in trainer.__mro__
            if base.__module__.startswith("trl_renyi")
            for name in vars(base)
            if name in foreign
        }
        assert overridden <= listed, sorted(overridden - listed)
