"""The ``trl-renyi`` command: ``trl-renyi {sft,dpo,eval,audit,demo,stability} ...``, in the style of ``trl sft``.

Every command is a module of this package with the two functions of TRL's scripts: ``make_parser()`` (a
:class:`~trl_renyi.cli.parsing.RenyiParser` over the command's dataclasses) and ``main(*parsed)`` (the parsed
dataclasses in the parser's order). ``trl-renyi NAME ARGS`` parses ``ARGS`` with the first and runs the second.
"""

from __future__ import annotations

import importlib
import sys

from trl_renyi.cli.parsing import run_command

# sub-command -> (module under trl_renyi.cli exposing make_parser() and main(*parsed), one-line description)
COMMANDS = {
    "sft": ("sft", "Train an α-Rényi LoRA ensemble with supervised fine-tuning (like `trl sft`)."),
    "dpo": ("dpo", "Train an α-Rényi LoRA ensemble with preference optimisation (like `trl dpo`)."),
    "eval": ("eval", "Evaluate an ensemble (and baselines) on multiple-choice or preference data."),
    "audit": ("audit", "List the training examples the ensemble disagrees on most."),
    "demo": ("demo", "Train a small ensemble on the embedded model and show what it is for."),
    "stability": ("stability", "When does spreading pay? The stability criterion, α* and a recommended α for a dataset."),
}


def usage() -> str:
    lines = ["usage: trl-renyi <command> [options]", "", "commands:"]
    lines += [f"  {name:<10}{description}" for name, (_, description) in COMMANDS.items()]
    lines.append("\nRun `trl-renyi <command> --help` for the options of a command.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"trl-renyi: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"trl_renyi.cli.{COMMANDS[command][0]}")

    def run(argv: list[str]) -> int:
        return module.main(*module.make_parser().parse_args_and_config(argv)) or 0

    return run_command(command, run, rest)


if __name__ == "__main__":
    sys.exit(main())
