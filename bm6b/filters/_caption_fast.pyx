# cython: language_level=3
"""Compiled caption rules (work in progress)."""
