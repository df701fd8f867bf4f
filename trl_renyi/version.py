"""The package version, at the bottom of the import graph (modules that record it import it from here)."""

__version__ = "0.1.0"
