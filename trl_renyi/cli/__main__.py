"""``python -m trl_renyi.cli``: the same as the ``trl-renyi`` command."""

import sys

from trl_renyi.cli import main

sys.exit(main())
