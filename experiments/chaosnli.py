"""ChaosNLI rows (SNLI, MNLI or αNLI part) → multi-annotator rows or TRL's plain prompt/completion rows.

SNLI/MNLI rows carry ``example.premise``/``example.hypothesis``, three labels e/n/c, the five original votes in
``old_labels`` and the 100 votes in ``label_count`` (order e, n, c). αNLI rows carry ``obs1``/``obs2``/``hyp1``/``hyp2``,
labels 1/2, one original vote ``old_label`` and ``label_count`` (order 1, 2). The label words are the completions;
the votes become ``completion_weights``: ``labels="original"`` uses the original votes, ``"sampled:K"`` draws K
votes from the 100 (``label_count``), ``"human"`` uses the 100-vote counts themselves.
"""

from __future__ import annotations

import random

NLI_LABELS = ("entailment", "neutral", "contradiction")
NLI_CODES = {"e": 0, "n": 1, "c": 2, "entailment": 0, "neutral": 1, "contradiction": 2}
ANLI_LABELS = ("1", "2")


def chaosnli_part(row: dict) -> str:
    """``"nli"`` (SNLI/MNLI: premise/hypothesis, 3 labels) or ``"anli"`` (αNLI: obs/hyp, 2 labels)."""
    example = row.get("example", row)
    if "premise" in example and "hypothesis" in example:
        return "nli"
    if all(key in example for key in ("obs1", "obs2", "hyp1", "hyp2")):
        return "anli"
    raise ValueError(f"not a ChaosNLI row (no premise/hypothesis nor obs1/obs2/hyp1/hyp2): keys {sorted(example)}")


def label_words(row: dict) -> tuple[str, ...]:
    return NLI_LABELS if chaosnli_part(row) == "nli" else ANLI_LABELS


def chaosnli_prompt(row: dict) -> str:
    """The plain-text prompt whose continuation is one label word (preceded by a space)."""
    example = row.get("example", row)
    if chaosnli_part(row) == "nli":
        return (
            f"Premise: {example['premise'].strip()}\nHypothesis: {example['hypothesis'].strip()}\n"
            "Does the premise entail the hypothesis? Answer entailment, neutral or contradiction.\nAnswer:"
        )
    return (
        f"Beginning: {example['obs1'].strip()}\nEnding: {example['obs2'].strip()}\n"
        f"1: {example['hyp1'].strip()}\n2: {example['hyp2'].strip()}\n"
        "Which middle, 1 or 2, best explains the ending?\nAnswer:"
    )


def human_distribution(row: dict) -> list[float]:
    """The 100-vote label distribution (label order as :func:`label_words`)."""
    counts = [float(c) for c in row["label_count"]]
    total = sum(counts)
    return [c / total for c in counts]


def vote_counts(row: dict, labels: str = "original", rng: random.Random | None = None) -> list[int]:
    """Votes per label word from the original annotators, K sampled from the 100, or the 100 (``"human"``)."""
    num = len(label_words(row))
    if labels == "original":
        counts = [0] * num
        if chaosnli_part(row) == "nli":
            for vote in row.get("old_labels") or [row["old_label"]]:
                counts[NLI_CODES[vote]] += 1
        else:
            counts[int(row["old_label"]) - 1] += 1
        return counts
    if labels == "human":
        return [int(c) for c in row["label_count"]]
    if labels.startswith("sampled:"):
        k = int(labels.split(":", 1)[1])
        rng = rng or random.Random(0)
        draws = rng.choices(range(num), weights=[float(c) for c in row["label_count"]], k=k)
        return [draws.count(i) for i in range(num)]
    raise ValueError(f"labels must be 'original', 'human' or 'sampled:K', got {labels!r}")


def chaosnli_to_multi_completion(rows, labels: str = "original", rng: random.Random | None = None) -> dict:
    """Columns ``prompt``, ``completions`` (label words, leading space), ``completion_weights`` (vote counts)."""
    out = {"prompt": [], "completions": [], "completion_weights": []}
    for row in rows:
        out["prompt"].append(chaosnli_prompt(row))
        out["completions"].append([" " + word for word in label_words(row)])
        out["completion_weights"].append(vote_counts(row, labels, rng))
    return out


def chaosnli_to_prompt_completion(rows, labels: str = "original", rng: random.Random | None = None) -> dict:
    """TRL's plain prompt/completion rows: one row per vote (a label with c votes appears c times)."""
    out = {"prompt": [], "completion": []}
    multi = chaosnli_to_multi_completion(rows, labels, rng)
    for prompt, completions, weights in zip(multi["prompt"], multi["completions"], multi["completion_weights"]):
        for completion, weight in zip(completions, weights):
            out["prompt"].extend([prompt] * int(weight))
            out["completion"].extend([completion] * int(weight))
    return out
