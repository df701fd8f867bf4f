"""docs/gen_api.py and the API page it writes: every link to an anchor of the page names one of its headings."""

import importlib.util
import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def gen_api():
    spec = importlib.util.spec_from_file_location("gen_api", DOCS / "gen_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_api_page_has_no_broken_anchors():
    text = (DOCS / "api.md").read_text()
    anchors = gen_api().local_anchors(text)
    links = re.findall(r"\]\(#([^)\s]+)\)", text)
    assert not [link for link in links if link not in anchors]


def test_anchors_copied_from_trl_point_to_trl_and_local_ones_stay():
    module = gen_api()
    page = "## `trl_renyi.cli.demo.run_demo`\n\nsee [run](#trl_renyiclidemorun_demo) and [formats](#prompt-completion)\n"
    resolved = module.resolve_anchors(page)
    assert "[run](#trl_renyiclidemorun_demo)" in resolved
    assert f"[formats]({module.TRL_DATASET_FORMATS}#prompt-completion)" in resolved


def test_the_api_page_is_current_and_every_entry_has_a_docstring():
    module = gen_api()
    text = module.render()
    assert text == (DOCS / "api.md").read_text(), "docs/api.md is out of date: run python docs/gen_api.py"
    assert "*(no docstring)*" not in text
    for name in ("RenyiDPOTrainer.score_pairs", "measure_stability", "PreferenceLikelihood", "group_training_rows"):
        assert name in text


def test_no_trainer_method_shadows_a_public_trainer_method_with_another_signature():
    """A method the trainers define under a public name of TRL's or transformers' trainer must keep that name's
    meaning: user scripts call e.g. ``trainer.log_metrics("train", metrics)``."""
    import inspect

    from trl_renyi import RenyiDPOTrainer, RenyiSFTTrainer

    module = gen_api()
    for trainer in (RenyiSFTTrainer, RenyiDPOTrainer):
        base = module._library_base(trainer)
        for klass in trainer.__mro__[: trainer.__mro__.index(base)]:
            for name, member in vars(klass).items():
                if name.startswith("_") or not inspect.isfunction(member) or not hasattr(base, name):
                    continue
                ours = inspect.signature(member).parameters
                theirs = next(  # the first definition up TRL's chain that names its parameters (not *args, **kwargs)
                    parameters
                    for parent in base.__mro__
                    if name in vars(parent)
                    for parameters in [inspect.signature(vars(parent)[name]).parameters]
                    if not any(p.kind is p.VAR_POSITIONAL for p in parameters.values())
                )
                kinds = {p.kind for p in ours.values()}
                if {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD} <= kinds:
                    continue  # passes every argument on
                extra = list(ours)[len(theirs) :]  # what we add must be optional: a call to theirs still fits ours
                assert list(ours)[: len(theirs)] == list(theirs), f"{klass.__name__}.{name}{list(ours)} shadows {name}{list(theirs)}"
                assert all(ours[p].default is not ours[p].empty or ours[p].kind is ours[p].VAR_KEYWORD for p in extra)
