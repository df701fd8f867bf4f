"""The package's layers (docs/architecture.md): every import of another part of the package goes downwards."""

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "trl_renyi"
#: top to bottom; a part may import the parts of any later layer, never of its own or an earlier one
LAYERS = [
    {"cli"},
    {"training", "evaluation"},
    {"inference", "stability"},
    {"hub"},
    {"model"},
    {"data"},
    {"objective", "preference", "compat", "atomic", "paths", "run_log", "version"},
]


def imports_between_parts() -> set[tuple[str, str]]:
    edges = set()
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).parts
        if relative == ("__init__.py",) or relative[0] == "testing.py":  # the package face; the test helpers
            continue
        part = relative[0].removesuffix(".py")
        for imported in re.findall(r"^\s*(?:from|import) trl_renyi\.(\w+)", path.read_text(), flags=re.M):
            if imported != part:
                edges.add((part, imported))
    return edges


def layer_of(part: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if part in layer)


def test_every_part_of_the_package_has_a_layer():
    parts = {p.name.removesuffix(".py") for p in PACKAGE.iterdir() if not p.name.startswith("_") and p.suffix in ("", ".py")}
    parts -= {"templates", "testing"}
    assert parts == set().union(*LAYERS)


def test_imports_go_downwards_only():
    upward = [(a, b) for a, b in imports_between_parts() if layer_of(b) <= layer_of(a)]
    assert not upward, f"imports that go up or sideways: {sorted(upward)}"
