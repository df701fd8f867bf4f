"""Write docs/api.md, the API reference, from the package's docstrings.

    python docs/gen_api.py            # rewrite docs/api.md
    python docs/gen_api.py --check    # exit 1 when docs/api.md is out of date

Every public class and function listed in ``SECTIONS`` is documented with its signature and docstring (public methods
of classes included); nothing is written by hand, so the reference cannot drift from the code.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent / "api.md"

# (section title, module, names or None for the module's ``__all__``, or every public name it defines)
SECTIONS = [
    ("Trainers", "trl_renyi.training.sft", ["RenyiSFTTrainer"]),
    ("Trainers", "trl_renyi.training.dpo", None),
    ("Configuration", "trl_renyi.training.config", ["RenyiEnsembleArguments", "RenyiSFTConfig", "RenyiDPOConfig"]),
    ("Ensemble", "trl_renyi.inference.ensemble", ["RenyiEnsemble", "EnsembleScorer"]),
    ("Scoring", "trl_renyi.inference.scoring", ["MemberModel", "ScoreResult", "score_completions"]),
    ("Objective", "trl_renyi.objective", None),
    ("Preference likelihood", "trl_renyi.preference", None),
    ("Stability criterion", "trl_renyi.stability", None),
    ("Uncertainty", "trl_renyi.inference.uncertainty", None),
    ("Choices", "trl_renyi.inference.choices", ["predict_choices", "predict_preferences", "ChoicePrediction"]),
    ("Generation", "trl_renyi.inference.generation", ["generate", "GeneratedText"]),
    ("Members", "trl_renyi.model.members", None),
    ("Member layer", "trl_renyi.model.layer", ["MemberBatchedLinear", "member_routing", "routed_members", "base_model_only", "member_names"]),
    ("Models", "trl_renyi.model.loading", ["load_causal_lm", "load_tokenizer", "hub_id"]),
    ("Data", "trl_renyi.data.conflict", None),
    ("Data", "trl_renyi.data.group_conflicts", None),
    ("Hub", "trl_renyi.hub", None),
    ("Demo", "trl_renyi.cli.demo", ["run_demo", "DemoConfig", "DemoResult"]),
    ("Demo", "trl_renyi.evaluation.families", ["evaluate_families", "FamilyReport", "uncertainty_gap"]),
]
# bare anchors in docstrings copied from TRL's configs point into TRL's dataset-formats page, not into this one
TRL_DATASET_FORMATS = "https://huggingface.co/docs/trl/dataset_formats"


def _doc(obj) -> str:
    return inspect.cleandoc(obj.__doc__) if obj.__doc__ else "*(no docstring)*"


def _signature(name: str, obj) -> str:
    try:
        return f"{name}{inspect.signature(obj)}"
    except (TypeError, ValueError):
        return name


def _public_names(module) -> list[str]:
    exported = getattr(module, "__all__", None)
    if exported is not None:
        return [name for name in exported if inspect.isclass(getattr(module, name)) or callable(getattr(module, name))]
    return [
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", None) == module.__name__
    ]


def _library_base(cls):
    """The first base of ``cls`` that comes from another library (TRL's trainer for ours), or None."""
    return next((base for base in cls.__mro__[1:] if not base.__module__.startswith("trl_renyi")), None)


def _methods(cls) -> list[tuple[str, object]]:
    """Public methods (and properties) that ``cls`` or its project bases define and that the library base it extends
    does not: for a trainer, what it adds to TRL's; what it overrides is documented by TRL."""
    inherited = set(dir(_library_base(cls))) if cls.__name__.endswith("Trainer") else set()
    out, seen = [], set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("trl_renyi"):
            break
        for name, member in vars(klass).items():
            if name.startswith("_") or name in seen or name in inherited:
                continue
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if isinstance(member, property):
                member = member.fget
            elif not inspect.isfunction(member):
                continue
            seen.add(name)
            out.append((name, member))
    return out


def heading_anchor(heading: str) -> str:
    """The anchor GitHub gives a markdown heading: lower case, punctuation other than ``-`` and ``_`` dropped,
    spaces as ``-``."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def local_anchors(markdown: str) -> set[str]:
    """The anchors of every heading in ``markdown`` (outside code blocks)."""
    anchors, in_code = set(), False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            anchors.add(heading_anchor(line))
    return anchors


def resolve_anchors(markdown: str) -> str:
    """Point every ``](#anchor)`` link that names no heading of the page to TRL's dataset-formats page."""
    anchors = local_anchors(markdown)

    def resolve(match):
        anchor = match.group(1)
        return match.group(0) if anchor in anchors else f"]({TRL_DATASET_FORMATS}#{anchor})"

    return re.sub(r"\]\(#([^)\s]+)\)", resolve, markdown)


def render() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `python docs/gen_api.py`; do not edit by hand.",
        "",
    ]
    current = None
    for title, module_name, names in SECTIONS:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:  # an optional module that is absent
            print(f"skipping {module_name}: {err}", file=sys.stderr)
            continue
        if title != current:
            lines += [f"## {title}", ""]
            current = title
        if names is None:
            lines += [f"`{module_name}`: " + _doc(module).split("\n\n")[0].replace("\n", " "), ""]
            names = _public_names(module)
        for name in names:
            obj = getattr(module, name)
            kind = "class" if inspect.isclass(obj) else "function"
            lines += [f"### `{module_name}.{name}`", "", "```python", f"{kind} {_signature(name, obj)}", "```", ""]
            lines += [_doc(obj), ""]
            if inspect.isclass(obj):
                for method_name, method in _methods(obj):
                    lines += [f"#### `{name}.{method_name}`", "", "```python", _signature(method_name, method), "```", ""]
                    lines += [_doc(method), ""]
    return resolve_anchors("\n".join(lines).rstrip() + "\n")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/api.md is out of date")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT} is out of date: run python docs/gen_api.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
