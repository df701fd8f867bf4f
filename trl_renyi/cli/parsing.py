"""Argument parsing and error reporting shared by every ``trl-renyi`` command.

:class:`RenyiParser` is TRL's ``TrlParser`` (every ``trl`` flag and ``--config file.yaml`` work) that answers a
misspelled flag with the closest known ones. :func:`run_command` turns the errors a user can fix (bad values,
missing files, data in the wrong format) into one line on stderr and exit status 1; ``--traceback`` or
``TRL_RENYI_TRACEBACK=1`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import os
import re
import sys
from dataclasses import field

from trl import TrlParser

from trl_renyi.objective import check_alpha

#: Errors that carry a message written for the user: reported in one line.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError, FloatingPointError)
TRACEBACK_FLAG = "--traceback"
TRACEBACK_ENV = "TRL_RENYI_TRACEBACK"


#: ``--chat`` values: render plain-string prompts with the tokenizer's chat template or not (auto: when it has one).
CHAT_MODES = {"auto": None, "yes": True, "no": False}


def chat_field():
    """The ``--chat`` flag of ``eval`` and ``audit`` (the scorers' ``use_chat_template``)."""
    return field(
        default="auto",
        metadata={
            "help": "Render plain-string prompts (and questions) as chat messages with the tokenizer's chat template "
            "(yes), as plain text — multiple-choice questions as 'Q: … A:' — (no), or by whether the tokenizer has a "
            "chat template (auto). Message lists always use the template.",
            "choices": list(CHAT_MODES),
        },
    )


def parse_alpha(text: str) -> float | str:
    """``--alpha``: a number, or ``auto`` (chosen by the stability criterion)."""
    try:
        return check_alpha(text, allow_auto=True)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


class RenyiParser(TrlParser):
    """``TrlParser`` with "did you mean" for unknown flags, and ``--alpha`` taking a number or ``auto``.

    (``HfArgumentParser`` turns the ``float | str`` field ``alpha`` into a float-only flag, so its type is set here.)"""

    def __init__(self, dataclass_types=None, **kwargs):
        super().__init__(dataclass_types, **kwargs)
        for action in self._actions:
            if action.dest == "alpha" and action.type is float:
                action.type = parse_alpha
                action.metavar = "{FLOAT,auto}"

    def known_flags(self) -> list[str]:
        """Every long flag, once: ``--num_members`` and not also its dashed alias ``--num-members``."""
        flags = [flag for action in self._actions for flag in action.option_strings if flag.startswith("--")]
        return [f for f in flags if "-" not in f[2:] or f[:2] + f[2:].replace("-", "_") not in flags]

    def suggestions(self, unknown, as_keys: bool = False) -> str:
        """``"--name (did you mean --known?)"``, comma-separated, for the flags in ``unknown`` (their values
        skipped); ``as_keys`` writes them as config-file keys, without the dashes."""
        parts = []
        for flag in unknown:
            if not str(flag).startswith("-"):
                continue
            name = str(flag).split("=", 1)[0]
            close = difflib.get_close_matches(name, self.known_flags(), n=2, cutoff=0.6)
            if as_keys:
                name, close = name.lstrip("-"), [c.lstrip("-") for c in close]
            parts.append(f"{name}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
        return ", ".join(parts) or ", ".join(map(str, unknown))

    def unknown_flag_message(self, unknown) -> str:
        return f"unrecognized arguments: {self.suggestions(unknown)}; see `{self.prog} --help`."

    def parse_args_and_config(self, args=None, *rest, **kwargs):
        listed = list(sys.argv[1:] if args is None else args)
        flags = [a for i, a in enumerate(listed) if a != "--config" and (i == 0 or listed[i - 1] != "--config")]
        _, unknown = self.parse_known_args(flags)  # unknown flags first, before any config is built
        if unknown and not kwargs.get("return_remaining_strings") and kwargs.get("fail_with_unknown_args", True):
            raise ValueError(self.unknown_flag_message(unknown))
        try:
            return super().parse_args_and_config(args, *rest, **kwargs)
        except ValueError as error:
            in_config = re.search(r"Unknown arguments from config file: (\[.*\])", str(error))
            if in_config:  # TRL's message for a YAML key that is no field: the same help as for a flag
                config = listed[listed.index("--config") + 1] if "--config" in listed[:-1] else "the config file"
                keys = self.suggestions(ast.literal_eval(in_config.group(1)), as_keys=True)
                raise ValueError(f"unknown keys in {config}: {keys}; see `{self.prog} --help`.") from None
            match = re.search(r"not used by the HfArgumentParser: (\[.*\])", str(error))
            if not match:
                raise
            raise ValueError(self.unknown_flag_message(ast.literal_eval(match.group(1)))) from None

    def error(self, message):  # argparse's own errors (unknown flags, bad choices, missing values)
        match = re.match(r"unrecognized arguments: (.*)", message)
        if match:
            message = self.unknown_flag_message(match.group(1).split())
        self.exit(2, f"{self.prog}: error: {message}\n")


def one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0] if len(text.splitlines()) == 1 else " ".join(line.strip() for line in text.splitlines())


def run_command(name: str, main, argv: list[str]) -> int:
    """Run a command's ``main(argv)``; user errors become one line (``trl-renyi NAME: error: ...``) and exit 1."""
    show = TRACEBACK_FLAG in argv or os.environ.get(TRACEBACK_ENV, "").lower() in ("1", "true", "yes")
    argv = [a for a in argv if a != TRACEBACK_FLAG]
    if show:
        return int(main(argv) or 0)
    try:
        return int(main(argv) or 0)
    except KeyboardInterrupt:
        print(f"trl-renyi {name}: interrupted.", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        print(f"trl-renyi {name}: error: {one_line(error)} (add {TRACEBACK_FLAG} for details)", file=sys.stderr)
        return 1
