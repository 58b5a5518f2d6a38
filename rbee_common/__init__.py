"""Pieces every rbee package shares: errors, output, paths, files, model references.

This package imports none of rbee_keeper, rbee_hive or worker, so all three can use it.
"""

__version__ = "0.1.0"
