"""The package's version, in a module of its own so that modules need not import the package (its facade)."""

__version__ = "0.1.0"
