"""Merge math: pure tensor functions, the record of each method, and the one registry pairing them.

``params`` and ``methods`` (the records) import no torch, so specs validate without it; a
record names its tensor function in ``combine``, and ``registry`` resolves the names. Nothing
is imported here, to keep it that way.
"""
