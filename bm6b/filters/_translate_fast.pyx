# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled translate-check scorer: the sub-scores of ``TranslateChecker.score`` with C loops.

``FastScorer.score`` returns the same ``TranslateScore`` as the pure-Python scorer in
``translate.py``, which stays the reference. It reads each caption once into counts and flags,
finds the CC-CEDICT words of the zh side with table lookups, and matches English stems to gloss
stems through integer ids and stamp arrays instead of Python sets.

With a text encoder, the ``embedding`` sub-score comes from the checker's ``_cosine``.
"""

from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.math cimport exp, log
from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t
from libc.math cimport sqrt
from libc.string cimport memset

import itertools

from bm6b.filters import translate as _py

cdef enum:
    HAN_TABLE_SIZE = 0x31350  # past the last Han code point of HAN_CLASS (U+3134F)
    BMP = 0x10000
    MAX_UNMATCHED = 6
    TOKEN_CACHE_LIMIT = 500000  # English tokens whose stems are kept; the cache is emptied past this
    FUNCTION_CHAR = 1  # flag in _bmp_flags: one of ZH_FUNCTION_CHARS
    NO_CHAR = 0x1FFFFF  # above every code point

cdef uint8_t _bmp_flags[BMP]
cdef uint8_t _zh_colour[BMP]  # bit index + 1 of the colour a character names, 0 for none
cdef uint8_t _zh_count[BMP]  # the count from two to ten a character names, 0 for none

cdef dict _COLOUR_BITS = {}
cdef dict _EN_COLOUR_MASK = {}
cdef dict _EN_COUNT_MASK = {}


cdef void _init_tables():
    memset(_bmp_flags, 0, BMP)
    memset(_zh_colour, 0, BMP)
    memset(_zh_count, 0, BMP)
    for char in _py.ZH_FUNCTION_CHARS:
        _bmp_flags[ord(char)] |= FUNCTION_CHAR
    names = sorted(set(_py._ZH_COLOURS.values()) | set(_py._EN_COLOURS.values()))
    for bit, name in enumerate(names):
        _COLOUR_BITS[name] = bit
    for char, name in _py._ZH_COLOURS.items():
        _zh_colour[ord(char)] = _COLOUR_BITS[name] + 1
    for word, name in _py._EN_COLOURS.items():
        _EN_COLOUR_MASK[word] = 1 << _COLOUR_BITS[name]
    for char, value in _py._ZH_COUNTS.items():
        _zh_count[ord(char)] = value
    for word, value in _py._EN_COUNTS.items():
        _EN_COUNT_MASK[word] = 1 << value


_init_tables()


cdef inline bint _is_han(Py_UCS4 c) nogil:
    return (0x3400 <= c <= 0x4DBF or 0x4E00 <= c <= 0x9FFF or 0xF900 <= c <= 0xFAFF
            or 0x20000 <= c <= 0x3134F)


cdef inline bint _is_letter(Py_UCS4 c):
    # The regex [^\W\d_]: a word character (alphanumeric or "_") that is not a decimal digit or "_".
    return c != u'_' and c.isalnum() and not c.isdecimal()


cdef inline bint _is_ascii_alnum(Py_UCS4 c) nogil:
    return (u'a' <= c <= u'z') or (u'A' <= c <= u'Z') or (u'0' <= c <= u'9')


cdef inline int _popcount(uint32_t x) nogil:
    cdef int n = 0
    while x:
        x &= x - 1
        n += 1
    return n


cdef inline int _remember(dict cache, object key, object value) except -1:
    # A full cache is emptied at once, which bounds its memory; the captions that follow refill it.
    if len(cache) >= TOKEN_CACHE_LIMIT:
        cache.clear()
    cache[key] = value
    return 0


cdef class _IntArrays:
    """Rows of int32 ids in one buffer (CSR): row i is ``data[start[i]:start[i + 1]]``."""

    cdef int32_t *start
    cdef int32_t *data
    cdef Py_ssize_t rows

    def __cinit__(self, list rows):
        cdef Py_ssize_t i, j, total = 0
        self.rows = len(rows)
        for row in rows:
            total += len(row)
        self.start = <int32_t *> PyMem_Malloc((self.rows + 1) * sizeof(int32_t))
        self.data = <int32_t *> PyMem_Malloc(max(total, 1) * sizeof(int32_t))
        if self.start == NULL or self.data == NULL:
            raise MemoryError()
        j = 0
        for i in range(self.rows):
            self.start[i] = j
            for value in rows[i]:
                self.data[j] = value
                j += 1
        self.start[self.rows] = j

    def __dealloc__(self):
        PyMem_Free(self.start)
        PyMem_Free(self.data)


cdef inline uint64_t _short_key(Py_UCS4 a, Py_UCS4 b, Py_UCS4 c) nogil:
    # Two or three code points packed exactly; NO_CHAR stands in for a missing third one.
    cdef uint64_t first = a, second = b, third = c
    return (first << 42) | (second << 21) | third


cdef inline uint64_t _mix(uint64_t x) nogil:
    x ^= x >> 33
    x *= 0xff51afd7ed558ccdULL
    x ^= x >> 33
    return x


cdef class _ShortPieces:
    """Open-addressing table from packed pieces of two or three characters to their piece codes.

    Looking a piece up needs no substring object, which the dict of longer pieces does.
    """

    cdef uint64_t *keys
    cdef int32_t *codes
    cdef uint64_t mask

    def __cinit__(self, dict packed):
        cdef uint64_t size = 1
        while size < 2 * len(packed) + 2:
            size <<= 1
        self.mask = size - 1
        self.keys = <uint64_t *> PyMem_Malloc(size * sizeof(uint64_t))
        self.codes = <int32_t *> PyMem_Malloc(size * sizeof(int32_t))
        if self.keys == NULL or self.codes == NULL:
            raise MemoryError()
        memset(self.keys, 0, size * sizeof(uint64_t))
        cdef uint64_t key, slot
        for packed_key, code in packed.items():
            key = packed_key
            slot = _mix(key) & self.mask
            while self.keys[slot] != 0:
                slot = (slot + 1) & self.mask
            self.keys[slot] = key
            self.codes[slot] = code

    cdef inline int32_t get(self, uint64_t key) nogil:
        cdef uint64_t slot = _mix(key) & self.mask
        while self.keys[slot] != 0:
            if self.keys[slot] == key:
                return self.codes[slot]
            slot = (slot + 1) & self.mask
        return 0

    def __dealloc__(self):
        PyMem_Free(self.keys)
        PyMem_Free(self.codes)


cdef class _Stamps:
    """One int32 per id; an id is marked when its entry equals the current stamp, so clearing is O(1)."""

    cdef int32_t *marks
    cdef Py_ssize_t size
    cdef int32_t stamp

    def __cinit__(self, Py_ssize_t size):
        self.size = size
        self.marks = <int32_t *> PyMem_Malloc(max(size, 1) * sizeof(int32_t))
        if self.marks == NULL:
            raise MemoryError()
        memset(self.marks, 0, max(size, 1) * sizeof(int32_t))
        self.stamp = 0

    cdef inline void clear(self):
        self.stamp += 1
        if self.stamp == 0x7FFFFFFF:
            memset(self.marks, 0, self.size * sizeof(int32_t))
            self.stamp = 1

    def __dealloc__(self):
        PyMem_Free(self.marks)


cdef class FastScorer:
    """The sub-scores and combined score of ``TranslateChecker.score``, for one checker.

    Built once per checker from its ``CedictIndex`` and ``CaptionConfig``; it reads the
    configuration then, so a changed configuration needs a new checker.
    """

    cdef object checker
    cdef object score_type
    cdef int max_chars
    # Dictionary words: one id per written form.
    cdef list words
    cdef int32_t *single_word  # Han code point -> id of the one-character word, or -1
    # Pieces of two or more characters that are words or start longer words, each with the code
    # (word id + 1) << 1 | starts-longer: packed in short_pieces up to three characters, else in
    # long_pieces.
    cdef _ShortPieces short_pieces
    cdef dict long_pieces
    cdef _IntArrays gloss_ids  # per word: ids of its gloss stems (ids < vocabulary size)
    cdef _IntArrays key_ids  # per word: ids of its ``match_keys``
    cdef dict key_id  # gloss stem or prefix key -> id; gloss stems first
    cdef Py_ssize_t vocabulary_size
    cdef dict token_info  # English token -> (content stem or None, colour bit, count bit)
    cdef dict stem_forms  # content stem -> tuple of ids of its ``alternatives`` that are gloss stems
    cdef dict stem_partial  # content stem -> tuple of ids of its ``partial_keys``
    cdef _Stamps form_marks, hit_marks, word_marks, matched_marks, partial_marks, key_marks
    # Per-call buffers: occurrences of dictionary words in zh (start, length, word id).
    cdef int32_t *occurrences
    cdef Py_ssize_t occurrence_capacity
    cdef uint8_t *covered
    cdef Py_ssize_t covered_capacity
    # Configuration.
    cdef double min_zh_han_share, max_en_han_share, chars_per_word, ratio_low, ratio_high, bias
    cdef double embedding_center
    cdef bint uses_encoder
    cdef object bilingual_encoder  # the checker's encoder when its cosine can run compiled, else None
    cdef dict weights

    def __cinit__(self):
        self.single_word = NULL
        self.occurrences = NULL
        self.covered = NULL

    def __init__(self, checker):
        self.checker = checker
        self.score_type = _py.TranslateScore
        index = checker.index
        config = checker.config
        self.max_chars = index.max_chars

        self.words = list(index.glosses)
        word_id = {word: i for i, word in enumerate(self.words)}
        self.single_word = <int32_t *> PyMem_Malloc(HAN_TABLE_SIZE * sizeof(int32_t))
        if self.single_word == NULL:
            raise MemoryError()
        cdef Py_ssize_t i
        for i in range(HAN_TABLE_SIZE):
            self.single_word[i] = -1
        cdef Py_UCS4 c
        for word in index.single_chars:
            c = word[0]
            if _is_han(c):
                self.single_word[c] = word_id[word]

        # A piece of size n starts a longer word when it is in index.heads[n].
        pieces = {}
        for word in index.keys:
            if len(word) >= 2:
                pieces[word] = (word_id[word] + 1) << 1
        for size, heads in index.heads.items():
            for head in heads:
                pieces[head] = pieces.get(head, 0) | 1
        packed = {}
        self.long_pieces = {}
        for piece, code in pieces.items():
            if len(piece) == 2:
                packed[_short_key(piece[0], piece[1], NO_CHAR)] = code
            elif len(piece) == 3:
                packed[_short_key(piece[0], piece[1], piece[2])] = code
            else:
                self.long_pieces[piece] = code
        self.short_pieces = _ShortPieces(packed)

        self.key_id = {}
        for word in self.words:
            for gloss in index.glosses[word]:
                if gloss not in self.key_id:
                    self.key_id[gloss] = len(self.key_id)
        self.vocabulary_size = len(self.key_id)
        gloss_rows, key_rows = [], []
        for word in self.words:
            glosses = index.glosses[word]
            gloss_row = sorted([self.key_id[g] for g in glosses])
            gloss_rows.append(gloss_row)
            extra = index.prefixes(word) - glosses
            for key in extra:
                if key not in self.key_id:
                    self.key_id[key] = len(self.key_id)
            key_rows.append(gloss_row + sorted([self.key_id[k] for k in extra]))
        self.gloss_ids = _IntArrays(gloss_rows)
        self.key_ids = _IntArrays(key_rows)

        self.token_info = {}
        self.stem_forms = {}
        self.stem_partial = {}
        self.form_marks = _Stamps(self.vocabulary_size)
        self.hit_marks = _Stamps(self.vocabulary_size)
        self.partial_marks = _Stamps(len(self.key_id))
        self.key_marks = _Stamps(len(self.key_id))
        self.word_marks = _Stamps(len(self.words))
        self.matched_marks = _Stamps(len(self.words))

        self.min_zh_han_share = config.translate_min_zh_han_share
        self.max_en_han_share = config.translate_max_en_han_share
        self.chars_per_word = config.zh_chars_per_en_word
        self.ratio_low = config.length_ratio_low
        self.ratio_high = config.length_ratio_high
        self.bias = config.translate_bias
        self.weights = dict(config.weights)
        self.uses_encoder = checker._uses_encoder()
        self.bilingual_encoder = None
        if self.uses_encoder and getattr(checker.encoder, "_fast_rows", None) is not None:
            self.bilingual_encoder = checker.encoder
        self.embedding_center = config.embedding_center

    def __dealloc__(self):
        PyMem_Free(self.single_word)
        PyMem_Free(self.occurrences)
        PyMem_Free(self.covered)

    cdef int _reserve(self, Py_ssize_t length) except -1:
        # Each position starts at most max_chars - 1 words of two or more characters and one of one.
        cdef Py_ssize_t needed = 3 * (length * self.max_chars + 1)
        cdef void *grown
        if needed > self.occurrence_capacity:
            grown = PyMem_Realloc(self.occurrences, needed * sizeof(int32_t))
            if grown == NULL:
                raise MemoryError()
            self.occurrences = <int32_t *> grown
            self.occurrence_capacity = needed
        if length + 1 > self.covered_capacity:
            grown = PyMem_Realloc(self.covered, (length + 1) * sizeof(uint8_t))
            if grown == NULL:
                raise MemoryError()
            self.covered = <uint8_t *> grown
            self.covered_capacity = length + 1
        return 0

    cdef Py_ssize_t _find_words(self, str zh, Py_ssize_t length) except -1:
        """Record every dictionary word in the Han runs of zh in ``occurrences``; return their count.

        The same words as ``CedictIndex.words_in``, with every occurrence: a piece grows only
        while it starts a longer written form, so each occurrence is reached from its start.
        """
        cdef Py_ssize_t i, run_end, size, n = 0, limit
        cdef Py_UCS4 c
        cdef int32_t word
        cdef long code
        i = 0
        while i < length:
            if not _is_han(zh[i]):
                i += 1
                continue
            run_end = i
            while run_end < length and _is_han(zh[run_end]):
                run_end += 1
            while i < run_end:
                c = zh[i]
                word = self.single_word[c]
                if word >= 0:
                    n = self._add_occurrence(n, i, 1, word)
                limit = min(self.max_chars, run_end - i)
                for size in range(2, limit + 1):
                    if size == 2:
                        code = self.short_pieces.get(_short_key(c, zh[i + 1], NO_CHAR))
                    elif size == 3:
                        code = self.short_pieces.get(_short_key(c, zh[i + 1], zh[i + 2]))
                    else:
                        code = self.long_pieces.get(zh[i : i + size], 0)
                    if code >> 1:
                        n = self._add_occurrence(n, i, size, <int32_t> ((code >> 1) - 1))
                    if not code & 1:
                        break
                i += 1
        return n

    cdef inline Py_ssize_t _add_occurrence(self, Py_ssize_t n, Py_ssize_t start, Py_ssize_t size, int32_t word):
        cdef int32_t *slot = self.occurrences + 3 * n
        slot[0] = <int32_t> start
        slot[1] = <int32_t> size
        slot[2] = word
        return n + 1

    cdef tuple _token_info(self, str token):
        """Return (content stem or None, colour bit, count bit) of an English token, cached."""
        info = self.token_info.get(token)
        if info is not None:
            return info
        word = token.split("'")[0] if "'" in token else token
        word_stem = None
        if word not in _py.EN_STOPWORDS and len(word) >= 2:
            word_stem = _py.stem(word)
        info = (word_stem, _EN_COLOUR_MASK.get(token, 0), _EN_COUNT_MASK.get(token, 0))
        _remember(self.token_info, token, info)
        return info

    cdef tuple _forms_of(self, str word_stem):
        forms = self.stem_forms.get(word_stem)
        if forms is None:
            key_id = self.key_id
            forms = tuple([key_id[f] for f in _py.alternatives(word_stem)
                           if f in key_id and key_id[f] < self.vocabulary_size])
            _remember(self.stem_forms, word_stem, forms)
        return forms

    cdef tuple _partial_of(self, str word_stem):
        partial = self.stem_partial.get(word_stem)
        if partial is None:
            key_id = self.key_id
            partial = tuple(sorted(key_id[k] for k in self.checker.index.partial_keys(word_stem) if k in key_id))
            _remember(self.stem_partial, word_stem, partial)
        return partial

    def score(self, str zh, str en):
        """Return the ``TranslateScore`` of a pair, equal to the pure-Python scorer's."""
        cdef Py_ssize_t zh_length = len(zh), en_length = len(en), i
        cdef Py_UCS4 c
        cdef Py_ssize_t han_count = 0, letters = 0, content = 0
        cdef bint zh_ascii = True, zh_has_latin = False, zh_has_latin_letter = False
        cdef bint en_ascii = True, en_has_digit = False
        cdef uint32_t zh_colour_mask = 0, zh_count_mask = 0

        for i in range(zh_length):
            c = zh[i]
            if c < 128:
                if _is_ascii_alnum(c):
                    zh_has_latin = True
                    if not (u'0' <= c <= u'9'):
                        zh_has_latin_letter = True
                        letters += 1
                continue
            zh_ascii = False
            if _is_han(c):
                han_count += 1
            if _is_letter(c):
                letters += 1
            if c < BMP:
                if 0x3400 <= c <= 0x9FFF and not (_bmp_flags[c] & FUNCTION_CHAR):
                    content += 1
                if _zh_colour[c]:
                    zh_colour_mask |= 1u << (_zh_colour[c] - 1)
                if _zh_count[c]:
                    zh_count_mask |= 1u << _zh_count[c]
        for i in range(en_length):
            c = en[i]
            if c >= 128:
                en_ascii = False
            elif u'0' <= c <= u'9':
                en_has_digit = True

        # Hard rules, as TranslateChecker._hard_rule.
        if not (han_count > 0 and en_ascii) and zh.strip().lower() == en.strip().lower():
            return self.score_type(0.0, {}, "identical")
        cdef double zh_han_share = 0.0
        if not zh_ascii and letters:
            zh_han_share = <double> han_count / <double> letters
        if zh_han_share < self.min_zh_han_share:
            return self.score_type(0.0, {}, "zh_not_chinese")
        cdef double en_han_share = 0.0 if en_ascii else _py.han_share(en)
        if en_han_share > self.max_en_han_share:
            return self.score_type(0.0, {}, "en_is_chinese")
        cdef Py_ssize_t latin_count = len(_py._LATIN_TOKEN_RE.findall(zh)) if zh_has_latin else 0

        # English tokens, as _EN_WORD_RE ([a-z]+(?:'[a-z]+)?) on the lower-cased caption.
        cdef str lowered = en.lower()
        cdef Py_ssize_t lowered_length = len(lowered), start
        cdef list tokens = []
        i = 0
        while i < lowered_length:
            c = lowered[i]
            if not (u'a' <= c <= u'z'):
                i += 1
                continue
            start = i
            while i < lowered_length and u'a' <= lowered[i] <= u'z':
                i += 1
            if i + 1 < lowered_length and lowered[i] == u"'" and u'a' <= lowered[i + 1] <= u'z':
                i += 1
                while i < lowered_length and u'a' <= lowered[i] <= u'z':
                    i += 1
            tokens.append(lowered[start:i])

        cdef dict seen = {}
        cdef uint32_t en_colour_mask = 0, en_count_mask = 0
        cdef tuple info
        for token in tokens:
            info = self._token_info(token)
            word_stem = info[0]
            if word_stem is not None and word_stem not in seen:
                seen[word_stem] = None
            en_colour_mask |= <uint32_t> info[1]
            en_count_mask |= <uint32_t> info[2]
        cdef list stems = list(seen)

        cdef Py_ssize_t unmatched = self._align(zh, zh_length, stems, zh_has_latin_letter)
        cdef Py_ssize_t uncovered = 0, runs = 0
        cdef bint in_run = False
        for i in range(zh_length):
            c = zh[i]
            if (0x3400 <= c <= 0x9FFF and not (_bmp_flags[c] & FUNCTION_CHAR)
                    and not self.covered[i]):
                uncovered += 1
                if not in_run:
                    runs += 1
                    in_run = True
            else:
                in_run = False

        cdef Py_ssize_t stem_count = len(stems)
        cdef double en_coverage = <double> (stem_count - unmatched) / <double> stem_count if stem_count else 0.0
        cdef double zh_coverage = <double> (content - uncovered) / <double> content if content else 0.0
        subscores = {
            "en_coverage": en_coverage,
            "zh_coverage": zh_coverage,
            "coverage_min": zh_coverage if zh_coverage < en_coverage else en_coverage,
            "en_unmatched": <double> min(unmatched, MAX_UNMATCHED),
            "zh_unmatched": <double> min(runs, MAX_UNMATCHED),
            "length": self._length(han_count + latin_count, len(tokens)),
        }
        if zh_has_latin or en_has_digit:
            tokens_score = _py.token_score(zh, en)
            if tokens_score is not None:
                subscores["tokens"] = tokens_score
        cdef uint32_t union_mask = zh_colour_mask | en_colour_mask
        if union_mask:
            subscores["colours"] = <double> _popcount(zh_colour_mask & en_colour_mask) / <double> _popcount(union_mask)
        if zh_has_latin:
            zh_count_mask = 0
            for value in _py.zh_counts(zh):
                zh_count_mask |= 1u << <int> value
        union_mask = zh_count_mask | en_count_mask
        if union_mask:
            subscores["counts"] = <double> _popcount(zh_count_mask & en_count_mask) / <double> _popcount(union_mask)
        cdef double cosine
        if self.uses_encoder:
            if self.bilingual_encoder is not None:
                cosine = encoder_cosine(self.bilingual_encoder, zh, en)
                subscores["embedding"] = cosine if cosine > 0.0 else 0.0
            else:
                subscores["embedding"] = self.checker._cosine(zh, en)
        return self.score_type(self._combine(subscores), subscores)

    cdef Py_ssize_t _align(self, str zh, Py_ssize_t zh_length, list stems, bint zh_has_latin_letter) except -1:
        """Match stems to the dictionary words of zh as ``TranslateChecker._align`` does.

        Fills ``covered`` for zh and returns the number of stems left unmatched.
        """
        self._reserve(zh_length)
        cdef Py_ssize_t occurrence_count = self._find_words(zh, zh_length)
        cdef Py_ssize_t i, j, k, s, stem_count = len(stems), unmatched
        cdef int32_t word, form
        cdef int32_t *row
        cdef Py_ssize_t row_length
        cdef _IntArrays glosses = self.gloss_ids, keys = self.key_ids
        cdef int32_t *forms_marks = self.form_marks.marks
        cdef int32_t *hits = self.hit_marks.marks
        cdef int32_t *matched = self.matched_marks.marks
        cdef int32_t *distinct = self.word_marks.marks

        self.form_marks.clear()
        self.hit_marks.clear()
        self.matched_marks.clear()
        self.word_marks.clear()
        cdef int32_t form_stamp = self.form_marks.stamp, hit_stamp = self.hit_marks.stamp
        cdef int32_t matched_stamp = self.matched_marks.stamp, word_stamp = self.word_marks.stamp

        cdef list forms_by_stem = [self._forms_of(word_stem) for word_stem in stems]
        for forms in forms_by_stem:
            for form in <tuple> forms:
                forms_marks[form] = form_stamp

        # Distinct words first; a word matches when one of its gloss stems is an English form.
        cdef list found_words = []
        for i in range(occurrence_count):
            word = self.occurrences[3 * i + 2]
            if distinct[word] == word_stamp:
                continue
            distinct[word] = word_stamp
            found_words.append(word)
            row = glosses.data + glosses.start[word]
            row_length = glosses.start[word + 1] - glosses.start[word]
            for k in range(row_length):
                if forms_marks[row[k]] == form_stamp:
                    matched[word] = matched_stamp
                    hits[row[k]] = hit_stamp

        # Latin words written in the zh caption (brand names, units) match by spelling; they
        # are not gloss stems, so they are compared as strings.
        latin_hits = None
        if zh_has_latin_letter:
            latin_hits = {_py.stem(token) for token in _py._EN_WORD_RE.findall(zh.lower())}
        cdef list unmatched_stems = []
        for s in range(stem_count):
            for form in <tuple> forms_by_stem[s]:
                if hits[form] == hit_stamp:
                    break
            else:
                if latin_hits is None or latin_hits.isdisjoint(_py.alternatives(stems[s])):
                    unmatched_stems.append(stems[s])
        unmatched = len(unmatched_stems)

        cdef int32_t *partial = self.partial_marks.marks
        cdef int32_t *word_keys = self.key_marks.marks
        cdef int32_t partial_stamp
        cdef list partial_by_stem
        cdef bint meets
        cdef bytearray found_stems
        if unmatched:
            self.partial_marks.clear()
            partial_stamp = self.partial_marks.stamp
            partial_by_stem = [self._partial_of(word_stem) for word_stem in unmatched_stems]
            any_keys = False
            for partial_keys in partial_by_stem:
                for form in <tuple> partial_keys:
                    partial[form] = partial_stamp
                    any_keys = True
            if any_keys:
                found_stems = bytearray(unmatched)
                for word in found_words:
                    row = keys.data + keys.start[word]
                    row_length = keys.start[word + 1] - keys.start[word]
                    meets = False
                    for k in range(row_length):
                        if partial[row[k]] == partial_stamp:
                            meets = True
                            break
                    if not meets:
                        continue
                    matched[word] = matched_stamp
                    self.key_marks.clear()
                    for k in range(row_length):
                        word_keys[row[k]] = self.key_marks.stamp
                    for s in range(unmatched):
                        if found_stems[s]:
                            continue
                        for form in <tuple> partial_by_stem[s]:
                            if word_keys[form] == self.key_marks.stamp:
                                found_stems[s] = 1
                                break
                unmatched -= sum(found_stems)

        memset(self.covered, 0, zh_length)
        cdef int32_t *occurrence
        for i in range(occurrence_count):
            occurrence = self.occurrences + 3 * i
            if matched[occurrence[2]] == matched_stamp:
                memset(self.covered + occurrence[0], 1, occurrence[1])
        return unmatched

    cdef double _length(self, Py_ssize_t zh_units, Py_ssize_t en_word_count):
        # length_score with the same floating-point steps.
        cdef double expected = en_word_count * self.chars_per_word
        if not expected > 1.0:
            expected = 1.0
        cdef double ratio = zh_units / expected
        if ratio <= 0.0:
            return 0.0
        cdef double log_ratio = log(ratio), edge, limit, value
        if log(0.5) <= log_ratio <= log(2.0):
            return 1.0
        if log_ratio < 0:
            edge, limit = log(0.5), log(self.ratio_low)
        else:
            edge, limit = log(2.0), log(self.ratio_high)
        value = 1.0 - (log_ratio - edge) / (limit - edge)
        return max(0.0, min(1.0, value))

    cdef double _combine(self, dict subscores):
        # TranslateChecker._combine, adding the terms in the same order.
        cdef double logit = self.bias, value
        weights = self.weights
        for name, raw in subscores.items():
            value = raw
            if name in _py.AGREEMENT_SUBSCORES:
                value -= 1.0
            elif name == "embedding":
                value -= self.embedding_center
            logit += <double> weights.get(name, 0.0) * value
        return 1.0 / (1.0 + exp(-logit))


# ---------------------------------------------------------------- bilingual encoder features


cdef inline bint _is_encoder_han(Py_UCS4 c):
    # The encoder's Han runs: [\u3400-\u9fff\uf900-\ufaff], without the supplementary planes.
    return 0x3400 <= c <= 0x9FFF or 0xF900 <= c <= 0xFAFF


cdef inline bint _is_ascii_lower_alnum(Py_UCS4 c):
    return (u'a' <= c <= u'z') or (u'0' <= c <= u'9')


cdef class _FeatureRows:
    """Appends the table row of each feature, as ``BilingualEncoder._table_rows`` does per feature."""

    cdef dict cache
    cdef dict bucket_rows
    cdef object buckets
    cdef Py_ssize_t max_cached
    cdef list rows

    def __cinit__(self, dict cache, dict bucket_rows, object buckets, Py_ssize_t max_cached):
        self.cache = cache
        self.bucket_rows = bucket_rows
        self.buckets = buckets
        self.max_cached = max_cached
        self.rows = []

    cdef int add(self, str feature) except -1:
        row = self.cache.get(feature)
        if row is None:
            row = self.bucket_rows.get(_crc32(feature.encode("utf-8")) % self.buckets, -1)
            if len(self.cache) < self.max_cached:
                self.cache[feature] = row
        if row >= 0:
            self.rows.append(row)
        return 0


cdef object _crc32 = None
cdef object _nfkc = None
cdef object _encoder_module = None


cdef void _bind_encoder_helpers():
    global _crc32, _nfkc, _encoder_module
    import unicodedata
    import zlib

    from bm6b.filters import bilingual_encoder

    _crc32 = zlib.crc32
    _nfkc = unicodedata.normalize
    _encoder_module = bilingual_encoder


def encoder_rows(encoder, str text, str language):
    """Return ``BilingualEncoder._table_rows(text, language)``: the same rows, in the same order.

    The order matters, because the float32 sum of the rows follows it.
    """
    if _encoder_module is None:
        _bind_encoder_helpers()
    if language != "zh" and language != "en":
        raise ValueError(f"invalid language {language!r}: expected 'zh' or 'en'")
    settings = encoder.settings
    cdef _FeatureRows rows = _FeatureRows(encoder._feature_rows[language], encoder._rows[language],
                                          settings.buckets, _encoder_module.MAX_CACHED_FEATURES)
    cdef str folded = _nfkc("NFKC", text).lower()
    if language == "zh" and settings.traditional_to_simplified:
        converter = _encoder_module._t2s_converter()
        if converter is not None:
            folded = converter.convert(folded)
    cdef Py_ssize_t length = len(folded), i = 0, start, end, size, j
    cdef int max_ngram
    cdef list words

    if language == "zh":
        # Character n-grams of each Han run, sizes 1 to zh_max_ngram, then "#" + each Latin token.
        max_ngram = settings.zh_max_ngram
        while i < length:
            if not _is_encoder_han(folded[i]):
                i += 1
                continue
            start = i
            while i < length and _is_encoder_han(folded[i]):
                i += 1
            for size in range(1, max_ngram + 1):
                for j in range(start, i - size + 1):
                    rows.add(folded[j : j + size])
        for token in _ascii_alnum_tokens(folded, length):
            rows.add("#" + token)
        return rows.rows

    # Word stems, then bigrams of adjacent stems.
    stem = _py.stem
    words = [stem(token) for token in _ascii_alnum_tokens(folded, length)]
    for word in words:
        rows.add(word)
    if settings.en_bigrams:
        for j in range(len(words) - 1):
            rows.add(f"{words[j]} {words[j + 1]}")
    return rows.rows


cdef list _ascii_alnum_tokens(str text, Py_ssize_t length):
    # The regex [a-z0-9]+ on lower-cased text.
    cdef list tokens = []
    cdef Py_ssize_t i = 0, start
    while i < length:
        if not _is_ascii_lower_alnum(text[i]):
            i += 1
            continue
        start = i
        while i < length and _is_ascii_lower_alnum(text[i]):
            i += 1
        tokens.append(text[start:i])
    return tokens


def summed_rows(const float[:, ::1] table, list rows):
    """Return ``numpy.add.reduce(table.take(rows, axis=0), axis=0)`` for a non-empty ``rows``.

    numpy adds the rows of a C-contiguous array one after the other when it reduces over axis 0,
    so this loop does the same float32 additions in the same order and gives the same bits.
    """
    import numpy

    cdef Py_ssize_t dim = table.shape[1], count = table.shape[0], j, k, row
    out = numpy.empty(dim, dtype=numpy.float32)
    cdef float[::1] total = out
    for k in range(len(rows)):
        row = rows[k]
        if not 0 <= row < count:
            raise IndexError(f"table row {row} out of range for {count} rows")
        if k == 0:
            for j in range(dim):
                total[j] = table[row, j]
        else:
            for j in range(dim):
                total[j] = total[j] + table[row, j]
    return out


def encoder_cosine(encoder, str zh, str en):
    """Return ``BilingualEncoder.cosine(zh, en)`` with the compiled rows and sums, the same float."""
    a_rows = encoder_rows(encoder, zh, "zh")
    b_rows = encoder_rows(encoder, en, "en")
    if not a_rows or not b_rows:
        return 0.0
    a = summed_rows(encoder.vectors["zh"], a_rows)
    b = summed_rows(encoder.vectors["en"], b_rows)
    cdef double norms = float(a @ a) * float(b @ b)
    return float(a @ b) / sqrt(norms) if norms > 0.0 else 0.0
