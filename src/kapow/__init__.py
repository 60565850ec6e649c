"""Kapow!: turn shell commands into HTTP APIs.

Deliberately empty of imports: ``kapow get`` and ``kapow set`` start from
this package on every request, so nothing heavy may load here.
"""

__version__ = "0.1.0"
