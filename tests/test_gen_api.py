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
