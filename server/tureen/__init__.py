"""Tureen: an inference server for model soups, merged live on the device."""

__version__ = "0.1.0"
