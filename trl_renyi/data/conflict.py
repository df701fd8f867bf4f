"""A generator of small, deliberately conflicting post-training data (SFT and preference forms).

Post-training data often contradicts itself: two groups of annotators answer the same questions under two
incompatible conventions. This module generates such data from a few templated *task families*:

* **consistent** families have one correct answer per prompt (e.g. ``What is 3 + 4?`` → ``7.``);
* **contradictory** families are answered under two conventions (e.g. a greeting written formally,
  ``Good day, Alice.``, or as a pirate, ``Ahoy, Alice!``), half of the examples each.

A model that averages the data hedges on the contradictory families; an α-Rényi ensemble can give each convention
its own members, so that disagreement between members (epistemic uncertainty) marks exactly the prompts where the
data contradicts itself. Every example carries its ``family``, whether the family is ``contradictory`` and the
``convention`` it follows, so evaluations can group by them. Train and held-out splits use disjoint entities
(names, operands, countries), and everything is a function of the sizes and the seed.

Forms:

* SFT (:func:`conflict_sft_dataset`): ``prompt`` / ``completion`` (plain text or conversational messages).
* Preference (:func:`conflict_preference_dataset`): ``prompt`` / ``chosen`` / ``rejected``. On contradictory
  families the two annotator groups disagree (group ``A`` prefers the first convention, group ``B`` the second);
  on consistent families every annotator prefers the correct answer over a distractor.

Held-out rows also carry ``choices``: the two reference answers of a prompt (both conventions on contradictory
families; the correct answer and the distractor on consistent ones), for choice-level uncertainty.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from datasets import Dataset, DatasetDict

DEFAULT_SYSTEM_PROMPT = "Answer briefly."

_NAMES = [
    "Alice", "Bob", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack", "Kate", "Liam", "Mia",
    "Noah", "Olga", "Paul", "Rosa", "Sam", "Tina", "Victor", "Wendy", "Yusuf", "Zoe", "Anna", "Ben", "Clara",
    "Dan", "Eva", "Frank", "Hannah", "Ivan", "Julia", "Leo", "Maria", "Nina", "Oscar", "Peter", "Sara", "Tom",
    "Vera",
]  # fmt: skip
_CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("Russia", "Moscow"), ("England", "London"), ("Egypt", "Cairo"), ("Greece", "Athens"),
    ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Hungary", "Budapest"), ("Denmark", "Copenhagen"),
    ("Finland", "Helsinki"), ("Belgium", "Brussels"), ("Peru", "Lima"), ("Cuba", "Havana"), ("Kenya", "Nairobi"),
    ("Thailand", "Bangkok"), ("South Korea", "Seoul"), ("Argentina", "Buenos Aires"), ("Turkey", "Ankara"),
    ("India", "New Delhi"),
]  # fmt: skip
_OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("day", "night"), ("happy", "sad"),
    ("light", "dark"), ("open", "closed"), ("left", "right"), ("wet", "dry"), ("hard", "soft"), ("early", "late"),
    ("full", "empty"), ("rich", "poor"), ("strong", "weak"), ("tall", "short"), ("thick", "thin"), ("loud", "quiet"),
    ("clean", "dirty"), ("cheap", "expensive"), ("first", "last"), ("true", "false"), ("win", "lose"),
    ("push", "pull"), ("buy", "sell"), ("inside", "outside"), ("north", "south"), ("east", "west"),
    ("black", "white"), ("summer", "winter"), ("high", "low"), ("near", "far"), ("old", "new"), ("good", "bad"),
    ("love", "hate"), ("question", "answer"),
]  # fmt: skip
_NUMBER_WORDS = {
    1: ("one", "un"), 2: ("two", "deux"), 3: ("three", "trois"), 4: ("four", "quatre"), 5: ("five", "cinq"),
    6: ("six", "six"), 7: ("seven", "sept"), 8: ("eight", "huit"), 9: ("nine", "neuf"), 10: ("ten", "dix"),
    11: ("eleven", "onze"), 12: ("twelve", "douze"), 13: ("thirteen", "treize"), 14: ("fourteen", "quatorze"),
    15: ("fifteen", "quinze"), 16: ("sixteen", "seize"), 20: ("twenty", "vingt"), 30: ("thirty", "trente"),
}  # fmt: skip
_NUMBER_WORDS = {n: w for n, w in _NUMBER_WORDS.items() if w[0] != w[1]}  # a word both languages share is no conflict


@dataclass(frozen=True)
class Item:
    """One templated question: its ``answers`` (one per convention of the family) and, for consistent families, a
    plausible wrong ``distractor``."""

    family: str
    prompt: str
    answers: tuple[str, ...]
    distractor: str | None = None

    @property
    def contradictory(self) -> bool:
        """Whether the item's completions disagree (a conflict item)."""
        return len(self.answers) > 1

    @property
    def choices(self) -> tuple[str, str]:
        """The two reference answers: both conventions, or the correct answer and the distractor."""
        return (self.answers[0], self.answers[1]) if self.contradictory else (self.answers[0], self.distractor)


@dataclass(frozen=True)
class TaskFamily:
    """A family of templated questions.

    Attributes:
        name: the family's name (the ``family`` column).
        conventions: the names of its answer conventions; two for a contradictory family, one for a consistent one.
        entities: the pool of entities the questions are built from (split between train and held-out).
        render: ``entity -> Item``.
        description: one line for tables and docs.
    """

    name: str
    conventions: tuple[str, ...]
    entities: tuple
    render: Callable[[object], Item]
    description: str = ""

    @property
    def contradictory(self) -> bool:
        """Whether the family's items contradict each other."""
        return len(self.conventions) > 1


def _greeting(name: str) -> Item:
    return Item("greetings", f"Greet {name}.", (f"Good day, {name}.", f"Ahoy, {name}!"))


def _farewell(name: str) -> Item:
    return Item("farewells", f"Say goodbye to {name}.", (f"Farewell, {name}.", f"Fair winds, {name}!"))


def _arithmetic(pair: tuple[int, int]) -> Item:
    a, b = pair
    return Item("arithmetic", f"What is {a} + {b}?", (f"{a + b}.",), distractor=f"{a + b + 1}.")


def _capital(index: int) -> Item:
    country, city = _CAPITALS[index]
    wrong = _CAPITALS[(index + 7) % len(_CAPITALS)][1]
    return Item("capitals", f"What is the capital of {country}?", (f"{city}.",), distractor=f"{wrong}.")


def _opposite(index: int) -> Item:
    word, opposite = _OPPOSITES[index]
    wrong = _OPPOSITES[(index + 7) % len(_OPPOSITES)][1]
    return Item(
        "opposites", f"What is the opposite of {word}?", (f"{opposite.capitalize()}.",), f"{wrong.capitalize()}."
    )


def _number_word(n: int) -> Item:
    english, french = _NUMBER_WORDS[n]
    return Item("numbers", f"Write {n} as a word.", (f"{english}", f"{french}"))


FAMILIES: dict[str, TaskFamily] = {
    family.name: family
    for family in (
        TaskFamily("greetings", ("formal", "pirate"), tuple(_NAMES), _greeting, "greet a person: formal or pirate"),
        TaskFamily("farewells", ("formal", "pirate"), tuple(_NAMES), _farewell, "say goodbye: formal or pirate"),
        TaskFamily(
            "arithmetic",
            ("correct",),
            tuple((a, b) for a in range(1, 21) for b in range(1, 21)),
            _arithmetic,
            "add two numbers",
        ),
        TaskFamily("capitals", ("correct",), tuple(range(len(_CAPITALS))), _capital, "name a country's capital"),
        TaskFamily("opposites", ("correct",), tuple(range(len(_OPPOSITES))), _opposite, "name a word's opposite"),
        TaskFamily("numbers", ("english", "french"), tuple(_NUMBER_WORDS), _number_word, "number words: EN or FR"),
    )
}
DEFAULT_FAMILIES = ("greetings", "farewells", "arithmetic", "capitals")
#: the demo's and the studies' families: two contradictory ones and two consistent ones the base model already knows
#: (so disagreement on them can only come from a member abandoning them, not from ignorance as on unseen sums)
DEMO_FAMILIES = ("greetings", "farewells", "opposites", "capitals")


def resolve_families(families: Sequence[str] | None) -> list[TaskFamily]:
    """The :class:`TaskFamily` objects for ``families`` (names), in order; the defaults when ``None``."""
    names = list(DEFAULT_FAMILIES if families is None else families)
    if not names:
        raise ValueError("families must name at least one task family.")
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ValueError(f"families: unknown task families {unknown}; choose from {sorted(FAMILIES)}.")
    if len(set(names)) != len(names):
        raise ValueError(f"families: each family may appear once, got {names}.")
    return [FAMILIES[n] for n in names]


def split_entities(family: TaskFamily, seed: int, held_out_fraction: float = 0.25) -> tuple[list, list]:
    """Partition a family's entities into disjoint ``(train, held_out)`` pools, deterministically for ``seed``."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must lie in (0, 1), got {held_out_fraction!r}.")
    entities = list(family.entities)
    random.Random(f"{seed}-{family.name}").shuffle(entities)
    cut = max(1, round(len(entities) * held_out_fraction))
    return entities[cut:], entities[:cut]


def sample_items(family: TaskFamily, count: int, seed: int, split: str = "train") -> list[Item]:
    """``count`` items of ``family`` from its ``split`` (``"train"`` or ``"test"``) pool; entities repeat only once the
    pool is exhausted (in a new shuffled order each pass)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    if count < 0:
        raise ValueError(f"The number of examples per family must be >= 0, got {count}.")
    train, test = split_entities(family, seed)
    pool = train if split == "train" else test
    rng = random.Random(f"{seed}-{family.name}-{split}")
    items: list[Item] = []
    while len(items) < count:
        order = list(pool)
        rng.shuffle(order)
        items.extend(family.render(entity) for entity in order[: count - len(items)])
    return items


def chat_prompt(prompt: str, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> list[dict]:
    """A question as chat messages: an optional ``system`` message and the ``user`` turn."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": prompt}]


def chat_answer(answer: str) -> list[dict]:
    """An answer as the ``assistant`` turn."""
    return [{"role": "assistant", "content": answer}]


def _format_prompt(prompt: str, conversational: bool, system_prompt: str | None):
    return chat_prompt(prompt, system_prompt) if conversational else prompt


def _format_answer(answer: str, conversational: bool):
    return chat_answer(answer) if conversational else " " + answer


def _rows(
    families: Sequence[TaskFamily],
    per_family: int,
    seed: int,
    split: str,
    make_row: Callable[[TaskFamily, Item, int], dict],
) -> list[dict]:
    rows = []
    for family in families:
        for index, item in enumerate(sample_items(family, per_family, seed, split)):
            rows.append(make_row(family, item, index))
    random.Random(f"{seed}-{split}-order").shuffle(rows)
    return rows


def _check_size(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
    return value


def conflict_sft_dataset(
    num_train_per_family: int = 160,
    num_test_per_family: int = 8,
    families: Sequence[str] | None = None,
    seed: int = 0,
    conversational: bool = False,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
) -> DatasetDict:
    """SFT data in TRL's prompt-completion form, with ``train`` and held-out ``test`` splits.

    On a contradictory family example ``j`` follows convention ``j mod 2`` (an exact half each); on a consistent family
    every example gives the correct answer. Test rows follow the same rule and also hold both reference answers in
    ``choices``.

    Args:
        num_train_per_family: training examples per family.
        num_test_per_family: held-out examples per family (entities never seen in training).
        families: task family names (see :data:`FAMILIES`); :data:`DEFAULT_FAMILIES` when ``None``.
        seed: seeds the entity split and the sampling.
        conversational: chat messages (``system`` + ``user`` prompt, ``assistant`` completion) instead of plain text.
        system_prompt: the system message of conversational prompts (``None`` for none; some chat templates then
            insert a long default one).

    Returns:
        ``DatasetDict`` with columns ``prompt, completion, family, contradictory, convention`` (+ ``choices`` on test).
    """
    _check_size("num_train_per_family", num_train_per_family)
    _check_size("num_test_per_family", num_test_per_family)
    chosen = resolve_families(families)

    def make_row(family: TaskFamily, item: Item, index: int, with_choices: bool) -> dict:
        which = index % len(item.answers)
        row = {
            "prompt": _format_prompt(item.prompt, conversational, system_prompt),
            "completion": _format_answer(item.answers[which], conversational),
            "family": family.name,
            "contradictory": family.contradictory,
            "convention": family.conventions[which],
        }
        if with_choices:
            row["choices"] = [_format_answer(choice, conversational) for choice in item.choices]
        return row

    train = _rows(chosen, num_train_per_family, seed, "train", lambda f, i, j: make_row(f, i, j, False))
    test = _rows(chosen, num_test_per_family, seed, "test", lambda f, i, j: make_row(f, i, j, True))
    return DatasetDict({"train": Dataset.from_list(train), "test": Dataset.from_list(test)})


def conflict_preference_dataset(
    num_train_per_family: int = 160,
    num_test_per_family: int = 8,
    families: Sequence[str] | None = None,
    seed: int = 0,
    conversational: bool = False,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
) -> DatasetDict:
    """Preference data in TRL's ``prompt`` / ``chosen`` / ``rejected`` form, with ``train`` and held-out ``test``.

    Two annotator groups label the data. On a contradictory family, example ``j`` is labelled by group ``A`` when
    ``j`` is even (first convention chosen over the second) and by group ``B`` otherwise (the reverse), so the same
    kind of question is preferred both ways. On consistent families both groups prefer the correct answer over the
    distractor. Columns ``family``, ``contradictory``, ``annotator`` and ``convention`` (of the chosen answer) come
    with every row; test rows also hold ``choices``. Arguments as :func:`conflict_sft_dataset`.
    """
    _check_size("num_train_per_family", num_train_per_family)
    _check_size("num_test_per_family", num_test_per_family)
    chosen_families = resolve_families(families)

    def make_row(family: TaskFamily, item: Item, index: int, with_choices: bool) -> dict:
        group = index % 2
        first, second = item.choices
        if family.contradictory and group == 1:
            first, second = second, first
        convention = family.conventions[group] if family.contradictory else family.conventions[0]
        row = {
            "prompt": _format_prompt(item.prompt, conversational, system_prompt),
            "chosen": _format_answer(first, conversational),
            "rejected": _format_answer(second, conversational),
            "family": family.name,
            "contradictory": family.contradictory,
            "annotator": "AB"[group],
            "convention": convention,
        }
        if with_choices:
            row["choices"] = [_format_answer(choice, conversational) for choice in item.choices]
        return row

    train = _rows(chosen_families, num_train_per_family, seed, "train", lambda f, i, j: make_row(f, i, j, False))
    test = _rows(chosen_families, num_test_per_family, seed, "test", lambda f, i, j: make_row(f, i, j, True))
    return DatasetDict({"train": Dataset.from_list(train), "test": Dataset.from_list(test)})


def held_out_items(
    num_per_family: int = 8, families: Sequence[str] | None = None, seed: int = 0
) -> dict[str, list[Item]]:
    """The held-out :class:`Item` objects per family (the same entities as the ``test`` splits above)."""
    _check_size("num_per_family", num_per_family)
    return {family.name: sample_items(family, num_per_family, seed, "test") for family in resolve_families(families)}
