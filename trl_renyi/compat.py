"""Every private TRL / transformers / PEFT internal that trl_renyi relies on, in one place.

The libraries' public extension points are used wherever they exist; what remains (a private hook of
``transformers.Trainer``, a TRL helper that is not exported, a PEFT registration method with a leading underscore)
is reached through this module only, so that an upgrade breaks in one file, with a message that names the
internal, instead of deep inside a training step.

Checked against the versions in :data:`CHECKED_VERSIONS`; ``tests/test_compat.py`` fails with a named message when
an expected internal is missing from the installed libraries.
"""

from __future__ import annotations

#: The library versions these internals were checked against (the upper bounds in ``pyproject.toml``).
CHECKED_VERSIONS = {"trl": "1.16", "transformers": "5.24", "peft": "0.21"}
