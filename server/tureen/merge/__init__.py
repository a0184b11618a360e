"""Merge math: pure tensor functions, their declarations, and the one registry pairing them.

``methods`` (declarations) imports no torch, so specs validate without it; ``registry`` pairs
each declaration with its function. Nothing is imported here, to keep it that way.
"""
