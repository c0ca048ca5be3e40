# cython: language_level=3
"""Compiled translate-check scorer (work in progress)."""
