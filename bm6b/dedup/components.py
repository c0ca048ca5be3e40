"""Connected components in Beam with alternating large-star and small-star rounds.

Nodes are strings, and each component's label is its smallest node. Every round is one
``GroupByKey`` over the current edges. Large-star links each node's larger neighbors to the
smallest node of its neighborhood, and small-star links a node and its smaller neighbors to the
smallest of them. Each edge incidence produces at most one output edge, so the edge count never
grows, and the edges converge to one star per component, centered on its smallest node.

Beam graphs have no loops, so ``rounds`` pairs of rounds are unrolled when the pipeline is
built. The tests check that a shuffled chain of 61 nodes converges within 8 pairs. Memory per
worker is one key's neighbor list, iterated twice and never copied, so on a runner with lazily
loaded iterables (Dataflow) even the center of a giant star streams. A component that has not
converged after the last round is counted by ``bm6b/components.unconverged`` and splits into
several clusters, each keeping its own smallest node. That keeps extra duplicates but never
merges two components.
"""

from __future__ import annotations

import logging
from typing import Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics

logger = logging.getLogger(__name__)

DEFAULT_ROUNDS = 8


def large_star(item: tuple[str, Iterable[str]]):
    """Link every larger neighbor of ``u`` to the smallest node of ``u``'s neighborhood."""
    u, neighbors = item
    smallest = min(min(neighbors, default=u), u)
    for v in neighbors:
        if v > u:
            yield v, smallest


def small_star(item: tuple[str, Iterable[str]]):
    """Link ``u`` and its smaller neighbors to the smallest of them."""
    u, smaller = item
    smallest = min(min(smaller, default=u), u)
    if u != smallest:
        yield u, smallest
    for v in smaller:
        if v != smallest:
            yield v, smallest


class _FinalLabels(beam.DoFn):
    """Emit (node, label) for every node whose label is a smaller node; check convergence."""

    def __init__(self):
        self.unconverged = Metrics.counter("bm6b", "components.unconverged")

    def process(self, item):
        node, grouped = item
        larger_flags = grouped["label_of"]
        smaller = grouped["points_to"]
        label = min(smaller, default=None)
        if label is not None and any(True for _ in larger_flags):
            # This node still has a smaller neighbor but is also some node's label: unconverged.
            self.unconverged.inc()
        if label is not None:
            yield node, label


class ConnectedComponents(beam.PTransform):
    """Turn an edge PCollection of (node, node) into (node, label) for every non-smallest node.

    Nodes that appear in no edge are not in the output; they are their own component.
    """

    def __init__(self, rounds: int = DEFAULT_ROUNDS):
        super().__init__()
        if rounds < 1:
            raise ValueError(f"invalid rounds {rounds}: expected at least 1")
        self.rounds = rounds

    def expand(self, edges):
        current = (
            edges
            | "Orient" >> beam.FlatMap(lambda e: [] if e[0] == e[1] else [(max(e), min(e))])
            | "DistinctEdges" >> beam.Distinct()
        )
        for index in range(self.rounds):
            current = (
                current
                | f"Large{index}Both" >> beam.FlatMap(lambda e: [(e[0], e[1]), (e[1], e[0])])
                | f"Large{index}Group" >> beam.GroupByKey()
                | f"Large{index}" >> beam.FlatMap(large_star)
                | f"Small{index}Group" >> beam.GroupByKey()
                | f"Small{index}" >> beam.FlatMap(small_star)
            )

        label_of = current | "LabelOf" >> beam.Map(lambda e: (e[1], True))
        return (
            {"points_to": current, "label_of": label_of}
            | "JoinLabels" >> beam.CoGroupByKey()
            | "FinalLabels" >> beam.ParDo(_FinalLabels())
        )
