"""``trl-renyi demo``: train a K = 4 ensemble on the embedded SmolLM2-135M-Instruct with generated conflicting data
and show its routing and its uncertainty per task family (a few minutes on a laptop CPU).

Every field of :class:`trl_renyi.demo.DemoConfig` is a flag (``--max_steps``, ``--alpha``, ``--output_dir``, ...);
``--config file.yaml`` works as for the other commands.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from trl import TrlParser

    from ..demo import DemoConfig, run_demo

    (config,) = TrlParser((DemoConfig,), prog="trl-renyi demo").parse_args_and_config(argv)
    run_demo(config)
    return 0
