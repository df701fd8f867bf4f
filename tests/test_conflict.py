"""The bundled conflicting-data generator: sizes, conventions, correctness, splits, determinism, both forms."""

import re
from collections import Counter

import pytest

from trl_renyi.data import DEFAULT_FAMILIES, FAMILIES, conflict_preference_dataset, conflict_sft_dataset, held_out_items

# independent descriptions of the conventions: completion pattern per (family, convention)
PATTERNS = {
    ("greetings", "formal"): r"^Good day, (\w+)\.$",
    ("greetings", "pirate"): r"^Ahoy, (\w+)!$",
    ("farewells", "formal"): r"^Farewell, (\w+)\.$",
    ("farewells", "pirate"): r"^Fair winds, (\w+)!$",
}


def entity(prompt: str) -> str:
    match = re.search(r"(?:Greet|goodbye to|capital of|opposite of) ([\w ]+?)[.?]$|What is (\d+ \+ \d+)\?$", prompt)
    assert match, prompt
    return match.group(1) or match.group(2)


def test_sft_sizes_columns_and_family_labels():
    data = conflict_sft_dataset(num_train_per_family=12, num_test_per_family=3, seed=1)
    assert len(data["train"]) == 12 * len(DEFAULT_FAMILIES) and len(data["test"]) == 3 * len(DEFAULT_FAMILIES)
    assert set(data["train"].column_names) == {"prompt", "completion", "family", "contradictory", "convention"}
    assert "choices" in data["test"].column_names
    counts = Counter(data["train"]["family"])
    assert counts == {family: 12 for family in DEFAULT_FAMILIES}
    for row in data["train"]:
        assert row["contradictory"] == (len(FAMILIES[row["family"]].conventions) == 2)


def test_contradictory_families_split_evenly_between_conventions_on_the_same_questions():
    data = conflict_sft_dataset(num_train_per_family=40, num_test_per_family=2, seed=0)["train"]
    for family in ("greetings", "farewells"):
        rows = [r for r in data if r["family"] == family]
        assert Counter(r["convention"] for r in rows) == {"formal": 20, "pirate": 20}
        by_person = {}
        for row in rows:
            match = re.match(PATTERNS[(family, row["convention"])], row["completion"].strip())
            assert match, (row["convention"], row["completion"])
            assert match.group(1) == entity(row["prompt"])  # the answer addresses the person in the prompt
            by_person.setdefault(match.group(1), set()).add(row["convention"])
        # the same question is answered both ways somewhere in the data
        assert any(len(conventions) == 2 for conventions in by_person.values())


def test_consistent_families_are_correct():
    data = conflict_sft_dataset(num_train_per_family=30, num_test_per_family=5, seed=3)
    for split in ("train", "test"):
        for row in data[split]:
            if row["family"] == "arithmetic":
                a, b = map(int, re.match(r"What is (\d+) \+ (\d+)\?", row["prompt"]).groups())
                assert row["completion"].strip() == f"{a + b}."
                assert row["convention"] == "correct" and not row["contradictory"]
                if split == "test":
                    assert row["choices"] == [f" {a + b}.", f" {a + b + 1}."]
            if row["family"] == "capitals" and entity(row["prompt"]) == "France":
                assert row["completion"].strip() == "Paris."


def test_opposites_family_is_correct():
    data = conflict_sft_dataset(num_train_per_family=40, num_test_per_family=9, families=["opposites"], seed=4)
    known = {"hot": "Cold.", "big": "Small.", "day": "Night.", "north": "South.", "black": "White.", "open": "Closed."}
    seen = 0
    for split in ("train", "test"):
        for row in data[split]:
            word = re.match(r"What is the opposite of (\w+)\?", row["prompt"]).group(1)
            assert re.fullmatch(r"[A-Z][a-z]+\.", row["completion"].strip()) and not row["contradictory"]
            if word in known:
                assert row["completion"].strip() == known[word]
                seen += 1
            if split == "test":
                assert row["choices"][0] == row["completion"] and row["choices"][1] != row["completion"]
    assert seen > 0


def test_held_out_entities_are_disjoint_from_training():
    data = conflict_sft_dataset(num_train_per_family=200, num_test_per_family=6, seed=5)
    train = {(r["family"], entity(r["prompt"])) for r in data["train"]}
    test = {(r["family"], entity(r["prompt"])) for r in data["test"]}
    assert test and not train & test
    items = held_out_items(6, seed=5)
    assert {(f, entity(i.prompt)) for f, its in items.items() for i in its} == test


def test_same_seed_same_data_other_seed_other_data():
    a = conflict_sft_dataset(num_train_per_family=10, seed=7)["train"].to_list()
    b = conflict_sft_dataset(num_train_per_family=10, seed=7)["train"].to_list()
    c = conflict_sft_dataset(num_train_per_family=10, seed=8)["train"].to_list()
    assert a == b and a != c


def test_conversational_form_and_system_prompt():
    data = conflict_sft_dataset(num_train_per_family=2, num_test_per_family=1, conversational=True, system_prompt="Be brief.")
    row = data["train"][0]
    assert [m["role"] for m in row["prompt"]] == ["system", "user"] and row["prompt"][0]["content"] == "Be brief."
    assert row["completion"][0]["role"] == "assistant"
    assert data["test"][0]["choices"][0][0]["role"] == "assistant"
    bare = conflict_sft_dataset(num_train_per_family=2, num_test_per_family=1, conversational=True, system_prompt=None)
    assert [m["role"] for m in bare["train"][0]["prompt"]] == ["user"]


def test_preference_form_annotators_disagree_only_on_contradictory_families():
    data = conflict_preference_dataset(num_train_per_family=20, num_test_per_family=2, seed=2)["train"]
    assert {"prompt", "chosen", "rejected", "family", "contradictory", "annotator"} <= set(data.column_names)
    for row in data:
        assert row["chosen"] != row["rejected"]
        if row["family"] in ("greetings", "farewells"):
            # group A prefers the formal answer, group B the pirate one
            preferred = "formal" if row["annotator"] == "A" else "pirate"
            other = "pirate" if preferred == "formal" else "formal"
            assert re.match(PATTERNS[(row["family"], preferred)], row["chosen"].strip())
            assert re.match(PATTERNS[(row["family"], other)], row["rejected"].strip())
        elif row["family"] == "arithmetic":
            a, b = map(int, re.match(r"What is (\d+) \+ (\d+)\?", row["prompt"]).groups())
            assert row["chosen"].strip() == f"{a + b}." and row["rejected"].strip() != f"{a + b}."
    groups = Counter((r["family"], r["annotator"]) for r in data)
    assert groups[("greetings", "A")] == groups[("greetings", "B")] == 10


def test_optional_family_and_errors_name_the_field():
    numbers = conflict_sft_dataset(num_train_per_family=4, num_test_per_family=1, families=["numbers", "arithmetic"])
    assert set(numbers["train"]["family"]) == {"numbers", "arithmetic"}
    with pytest.raises(ValueError, match="families"):
        conflict_sft_dataset(families=["greetings", "poetry"])
    with pytest.raises(ValueError, match="num_train_per_family"):
        conflict_sft_dataset(num_train_per_family=-1)
    with pytest.raises(ValueError, match="num_test_per_family"):
        conflict_preference_dataset(num_test_per_family=1.5)
