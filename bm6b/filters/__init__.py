"""Per-record logic of every stage, as plain functions and classes testable without Beam."""
