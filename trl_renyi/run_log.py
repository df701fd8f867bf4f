"""The package's log: what a run does, on stderr from INFO up, as transformers sets up its own library logger.

Every module logs to a child of the ``trl_renyi`` logger (``logging.getLogger(__name__)``). That logger gets one
stream handler of its own (unless the application gave it one), which stays quiet while the root logger has handlers:
an application that set up its own logging (or pytest's capture) receives the records through the root as usual, and
a line is printed once either way. A trainer sets its level from the training
arguments at construction (:func:`set_run_log_level`): the main process at ``log_level`` (INFO when that is
``"passive"``), every other process at ``log_level_replica``.
"""

from __future__ import annotations

import logging

LOGGER_NAME = "trl_renyi"


def configure_library_logger() -> logging.Logger:
    """The ``trl_renyi`` logger with its stream handler (idempotent)."""
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[trl_renyi] %(message)s"))
        handler.addFilter(lambda record: not logging.getLogger().handlers)  # the application's own set-up wins
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return logger


#: TrainingArguments' log level names (``"passive"``: keep the package's INFO)
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
           "critical": logging.CRITICAL}  # fmt: skip


def set_run_log_level(args) -> None:
    """The package's level for this process from ``args`` (``log_level`` on the process that logs,
    ``log_level_replica`` on the others)."""
    name = args.log_level if args.should_log else args.log_level_replica
    level = _LEVELS.get(str(name), logging.INFO if args.should_log else logging.WARNING)
    configure_library_logger().setLevel(level)
