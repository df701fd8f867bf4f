"""Every command the README and docs/ show parses as written: its flags exist and its values have the right types.

Commands are read from the pages' code blocks (continuation lines joined) and from inline code that carries a flag
or runs a script.
``trl-renyi NAME ARGS`` (and ``python examples/sft_renyi.py``, the same script as ``trl-renyi sft``) go through the
command's own parser, ``--config`` files included; ``python experiments|benchmarks|docs/SCRIPT ARGS`` through the
script's ``parse_args``. Nothing is trained: a renamed or removed flag fails here instead of in a reader's terminal.
"""

import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PREFIXES = ("trl-renyi ", "python examples/", "python experiments/", "python benchmarks/", "python docs/", "accelerate launch ")
#: stand-ins for omitted arguments: such a command is an outline, not something to run
PLACEHOLDERS = ("…", " ... ", "<", "{")
#: the commands of the trl-renyi scripts in examples/
EXAMPLE_SCRIPTS = {"examples/sft_renyi.py": "sft", "examples/dpo_renyi.py": "dpo"}


def page_commands(text: str) -> list[str]:
    """The commands of one markdown page, in order."""
    found, in_code, pending = [], False, ""
    for line in text.splitlines():
        if line.strip().startswith("```"):
            in_code, pending = not in_code, ""
            continue
        if in_code:
            command = f"{pending} {line.strip()}".strip()
            if command.endswith("\\"):
                pending = command[:-1].strip()
                continue
            pending = ""
            command = re.sub(r"^(\$ |[A-Z_]+=\S+ )+", "", command).split("  #")[0].split(" # ")[0].strip()
            if command.startswith(PREFIXES):
                found.append(command)
        else:
            inline = re.findall(r"`([^`]+)`", line)  # prose names a command bare ("`trl-renyi sft`"): scripts only
            found += [m for m in inline if m.startswith(PREFIXES) and (" --" in m or m.startswith("python "))]
    return [c for c in found if not any(p in f" {c} " for p in PLACEHOLDERS)]


COMMANDS = [(page.name, command) for page in PAGES if page.name != "api.md" for command in page_commands(page.read_text())]


def script_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"doc_command_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(command: str) -> None:
    """Parse ``command`` with the parser it would run under (``SystemExit(0)`` for ``--help`` is success)."""
    words = shlex.split(command)
    if words[:2] == ["accelerate", "launch"]:
        words = words[2:]
        while words and words[0].startswith("--"):  # accelerate's own flags, with their values
            words = words[2:] if len(words) > 1 and not words[1].startswith("--") and not words[1].endswith(".py") else words[1:]
        if not words:
            return
        if words[0] == "-m" and words[1] == "trl_renyi.cli":
            words = ["trl-renyi", *words[2:]]
        else:
            words = ["python", *words]
    if words[0] == "python" and words[1] in EXAMPLE_SCRIPTS:
        words = ["trl-renyi", EXAMPLE_SCRIPTS[words[1]], *words[2:]]
    try:
        if words[0] == "trl-renyi":
            from trl_renyi.cli import COMMANDS as CLI

            name, args = words[1], words[2:]
            assert name in CLI, f"unknown trl-renyi command {name!r}"
            module = importlib.import_module(f"trl_renyi.cli.{CLI[name][0]}")
            module.make_parser().parse_args_and_config(args)
        else:
            path = REPO / words[1]
            if not path.is_file():
                pytest.skip(f"{words[1]} is the reader's own script")
            module = script_module(path)
            assert hasattr(module, "parse_args"), f"{words[1]} has no parse_args(argv) to check its flags with"
            module.parse_args(words[2:])
    except SystemExit as exit_:
        assert exit_.code in (0, None), f"{command!r} does not parse (exit {exit_.code})"
    except ValueError as err:  # the trl-renyi parsers name an unknown flag, and the configs a bad value, this way
        raise AssertionError(f"{command!r} does not parse: {err}") from err


def test_the_pages_show_commands_of_every_kind():
    kinds = {c.split()[0] + " " + c.split()[1].split("/")[0] for _, c in COMMANDS}
    assert {"trl-renyi sft", "trl-renyi dpo", "trl-renyi eval", "trl-renyi audit", "trl-renyi demo"} <= kinds
    assert any(c.startswith("python experiments/") for _, c in COMMANDS)
    assert any(c.startswith("python benchmarks/") for _, c in COMMANDS)


def test_a_continued_command_is_joined_and_a_placeholder_skipped():
    text = "```bash\ntrl-renyi sft --alpha 0 \\\n    --num_members 2  # two\ntrl-renyi sft … --x\n```\nsee `trl-renyi eval`\n"
    assert page_commands(text) == ["trl-renyi sft --alpha 0 --num_members 2"]


def test_a_renamed_flag_fails_to_parse():
    with pytest.raises(AssertionError, match="does not parse"):
        parse("trl-renyi sft --num_memberz 2")


@pytest.mark.parametrize(("page", "command"), COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_every_documented_command_parses(page, command, monkeypatch):
    monkeypatch.chdir(REPO)  # --config paths are relative to the repository
    parse(command)
