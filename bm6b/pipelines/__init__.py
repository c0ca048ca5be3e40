"""Beam pipelines: the curate job and its stages."""
