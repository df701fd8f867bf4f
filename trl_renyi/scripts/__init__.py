"""Entry points of the ``trl-renyi`` sub-commands; each module exposes ``main(argv: list[str]) -> int``."""
