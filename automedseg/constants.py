"""Constants shared by modules that must not import each other.

``checks`` (imported by ``fingerprint``, ``pipeline``, the CLI) and ``training`` (which imports torch) both
need the number of cross-validation folds; it lives here so neither imports the other.
"""

N_SPLITS = 5
"""Folds of the cross-validation: ``train --fold 0..N_SPLITS-1``; ``check`` and ``plan`` refuse fewer cases."""
