"""Merge math: pure tensor functions and the one registry of merge methods.

This package imports torch and pydantic only; it knows nothing of specs, files or servers.
"""

from tureen.merge.registry import METHODS, MergeMethod, MethodParams, lookup

__all__ = ["METHODS", "MergeMethod", "MethodParams", "lookup"]
