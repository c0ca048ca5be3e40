"""A cheap pre-check that detects when a case-insensitive regex cannot match a text.

Most captions match none of the boilerplate or blocklist patterns, yet a ``re`` alternation of
patterns that start with ``\\b`` tries every pattern at every position. ``LiteralGate`` extracts
from each pattern a set of strings one of which occurs in every match, and checks the text for
them with one Aho-Corasick pass (pyahocorasick) over the lower-cased text. When none occurs, the
regex cannot match and is skipped.

The pass is exact for ASCII literals because ``str.lower`` keeps every character in place and maps
it to a single character, except for U+0130. ``re.IGNORECASE`` also matches four non-ASCII
characters to ASCII letters (U+0130 and U+0131 to i, U+017F to s, U+212A to k, in Python 3.11),
so text that contains one of them always goes to the regex.
"""

from __future__ import annotations

import re
from typing import Iterable

import ahocorasick

try:
    from re import _constants as _sre, _parser as _sre_parse  # Python >= 3.11
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre
    import sre_parse as _sre_parse


def _required_literals(items) -> set[str] | None:
    """Return strings one of which occurs in every match of the parsed ``items``, or None."""
    candidates: list[set[str]] = []
    run: list[str] = []
    for op, argument in items:
        if op is _sre.LITERAL:
            run.append(chr(argument))
            continue
        if run:
            candidates.append({"".join(run)})
            run = []
        if op is _sre.SUBPATTERN:
            inner = _required_literals(argument[-1])
        elif op is _sre.BRANCH:
            alternatives = [_required_literals(branch) for branch in argument[1]]
            inner = set().union(*alternatives) if all(alternatives) else None
        elif op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", None)) and argument[0] >= 1:
            inner = _required_literals(argument[2])
        else:
            inner = None
        if inner:
            candidates.append(inner)
    if run:
        candidates.append({"".join(run)})
    if not candidates:
        return None
    # The set whose shortest string is longest rejects the most text.
    return max(candidates, key=lambda strings: min(len(s) for s in strings))


# Non-ASCII characters that re.IGNORECASE matches to an ASCII letter. tests/test_text_quality.py
# derives the same set from the re module and str.lower.
_ASCII_CASE_VARIANTS_RE = re.compile("[\u0130\u0131\u017f\u212a]")


def _is_uncased(char: str) -> bool:
    return char.lower() == char == char.upper()


class LiteralGate:
    """Decide with one Aho-Corasick pass whether any of a set of regexes may match ASCII text.

    ``patterns`` are regex sources compiled with ``re.IGNORECASE``. ``may_match`` returns False
    only when no pattern can match the text. A pattern without extractable literals, or with a
    cased non-ASCII literal, turns the gate off (``may_match`` always True).
    """

    def __init__(self, patterns: Iterable[str]):
        self.enabled = True
        literals: set[str] = set()
        for pattern in patterns:
            required = _required_literals(_sre_parse.parse(pattern, re.IGNORECASE))
            if required is None:
                self.enabled = False
                break
            for literal in required:
                if all(ch.isascii() or _is_uncased(ch) for ch in literal):
                    # Uncased characters (Han, kana) match only themselves and lower() keeps them.
                    literals.add(literal.lower())
                else:
                    # A cased non-ASCII character such as U+017F can match ASCII under IGNORECASE.
                    self.enabled = False

        self._automaton = None
        if self.enabled and literals:
            automaton = ahocorasick.Automaton()
            for literal in literals:
                automaton.add_word(literal, literal)
            automaton.make_automaton()
            self._automaton = automaton

    def may_match(self, text: str) -> bool:
        if not self.enabled:
            return True
        if not text.isascii() and _ASCII_CASE_VARIANTS_RE.search(text) is not None:
            return True
        if self._automaton is None:
            return False
        for _ in self._automaton.iter(text.lower()):
            return True
        return False
