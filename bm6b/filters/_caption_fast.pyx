# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Compiled caption rules: normalization, junk and content rules, language ID corrections, Chinese script.

Each function returns what its pure-Python counterpart in ``text_normalize``, ``text_quality``,
``lid`` or ``captions`` returns, including every detail string. Character classes are tested
in C loops, one pass over the text counting several classes at once. Rare inputs (HTML, control
characters, text that NFKC changes, possible blocklist or boilerplate matches, URLs and camera
file names) go to the Python rules, which stay the reference.

This module imports nothing from bm6b when it loads, because ``text_normalize`` imports it while
the caption modules are still loading. ``_init`` binds the Python helpers on the first call.
"""

cimport cython
from cpython.unicode cimport Py_UNICODE_ISALNUM, Py_UNICODE_ISDECIMAL, Py_UNICODE_ISSPACE
from libc.stdlib cimport free, malloc
from libc.string cimport memset


cdef extern from "Python.h":
    int PyUnicode_KIND(object text)
    void *PyUnicode_DATA(object text)
    Py_UCS4 PyUnicode_READ(int kind, void *data, Py_ssize_t index) nogil
    bint PyUnicode_IS_ASCII(object text)


# ---------------------------------------------------------------- character classes

# Flags of the ASCII characters, filled by _fill_ascii_table at import.
cdef enum:
    A_SPACE = 1  # str.isspace
    A_WORD = 2  # regex \w: letters, digits, underscore
    A_LETTER = 4  # regex [^\W\d_]: A-Z, a-z
    A_DIGIT = 8
    A_PUNCT = 16  # sentence punctuation that the special-character rule does not count
    A_PRINTABLE = 32  # U+0020..U+007E

cdef unsigned char ASCII_FLAGS[128]


cdef void _fill_ascii_table():
    cdef int c
    memset(ASCII_FLAGS, 0, sizeof(ASCII_FLAGS))
    for c in range(128):
        if chr(c).isspace():
            ASCII_FLAGS[c] |= A_SPACE
        if chr(c).isalnum() or c == 95:
            ASCII_FLAGS[c] |= A_WORD
        if chr(c).isalpha():
            ASCII_FLAGS[c] |= A_LETTER
        if 48 <= c <= 57:
            ASCII_FLAGS[c] |= A_DIGIT
        if chr(c) in ".,;:!?'\"()-":
            ASCII_FLAGS[c] |= A_PUNCT
        if 32 <= c <= 126:
            ASCII_FLAGS[c] |= A_PRINTABLE


_fill_ascii_table()


cdef inline bint is_han(Py_UCS4 c) noexcept nogil:
    # text_normalize.HAN_CLASS
    return (0x4E00 <= c <= 0x9FFF or 0x3400 <= c <= 0x4DBF or 0xF900 <= c <= 0xFAFF
            or 0x20000 <= c <= 0x3134F)


cdef inline bint is_kana_hangul(Py_UCS4 c) noexcept nogil:
    # text_normalize.KANA_CLASS and HANGUL_CLASS
    return (0x3040 <= c <= 0x30FF or 0x31F0 <= c <= 0x31FF or 0xAC00 <= c <= 0xD7AF
            or 0x1100 <= c <= 0x11FF or 0x3130 <= c <= 0x318F)


cdef inline bint is_latin_extended(Py_UCS4 c) noexcept nogil:
    # The non-ASCII part of the Latin-word classes in lid and text_quality: U+00C0..U+024F.
    return 0xC0 <= c <= 0x24F


cdef inline bint is_case_variant(Py_UCS4 c) noexcept nogil:
    # Characters that re.IGNORECASE matches to an ASCII letter (literal_gate._ASCII_CASE_VARIANTS_RE).
    return c == 0x130 or c == 0x131 or c == 0x17F or c == 0x212A


cdef inline bint is_sentence_punct(Py_UCS4 c) noexcept nogil:
    # The non-ASCII characters that text_quality._SPECIAL_RE leaves out.
    return (0x2010 <= c <= 0x2015 or c == 0x2018 or c == 0x2019 or c == 0x201C or c == 0x201D
            or c == 0x2026 or c == 0xB7 or c == 0x3001 or c == 0x3002 or c == 0xFF0C or c == 0xFF01
            or c == 0xFF1F or c == 0xFF1A or c == 0xFF1B or c == 0xFF08 or c == 0xFF09
            or 0x300A <= c <= 0x300F or c == 0x3010 or c == 0x3011)


cdef inline bint is_pre_nfkc(Py_UCS4 c) noexcept nogil:
    # A character of text_normalize._PRE_NFKC_RE other than whitespace, "&" and "<", which the
    # caller tests.
    if c < 0x20 or 0x7F <= c <= 0x9F or 0xC0 <= c <= 0xFF or c == 0xAD:
        return True
    if c < 0x152:
        return False
    if (c == 0x152 or c == 0x153 or c == 0x160 or c == 0x161 or c == 0x178 or c == 0x17D or c == 0x17E
            or c == 0x192 or c == 0x2C6 or c == 0x2DC):
        return True
    if c < 0x2000:
        return False
    if (0x200B <= c <= 0x200F or 0x202A <= c <= 0x202E or 0x2060 <= c <= 0x2064 or 0x2066 <= c <= 0x2069
            or c == 0x2020 or c == 0x2021 or c == 0x2030 or c == 0x2039 or c == 0x203A or c == 0x20AC
            or c == 0x2122 or c == 0x2028 or c == 0x2029):
        return True
    return (0xD800 <= c <= 0xDFFF or c == 0xFEFF or 0xFE00 <= c <= 0xFE0F or 0xE0000 <= c <= 0xE007F)


cdef inline bint is_nfkc_stable(Py_UCS4 c) noexcept nogil:
    # Characters with NFKC_Quick_Check=Yes and combining class 0 that compose with nothing, so a
    # string of them is its own NFKC form: printable ASCII, CJK unified ideographs (main block and
    # extension A), and the ideographic comma and full stop.
    return 0x20 <= c <= 0x7E or 0x4E00 <= c <= 0x9FFF or 0x3400 <= c <= 0x4DBF or c == 0x3001 or c == 0x3002


cdef inline bint is_zh_punct(Py_UCS4 c) noexcept nogil:
    # text_normalize._ZH_PUNCT
    return c == 0xFF0C or c == 0xFF01 or c == 0xFF1F or c == 0xFF1A or c == 0xFF1B or c == 0xFF08 or c == 0xFF09


cdef inline bint is_word(Py_UCS4 c) noexcept:
    if c < 128:
        return ASCII_FLAGS[c] & A_WORD
    return Py_UNICODE_ISALNUM(c)


cdef inline bint is_space(Py_UCS4 c) noexcept:
    if c < 128:
        return ASCII_FLAGS[c] & A_SPACE
    return Py_UNICODE_ISSPACE(c)


cdef inline bint is_decimal(Py_UCS4 c) noexcept:
    if c < 128:
        return ASCII_FLAGS[c] & A_DIGIT
    return Py_UNICODE_ISDECIMAL(c)


cdef inline bint is_letter(Py_UCS4 c) noexcept:
    # regex [^\W\d_]
    if c < 128:
        return ASCII_FLAGS[c] & A_LETTER
    return Py_UNICODE_ISALNUM(c) and not Py_UNICODE_ISDECIMAL(c)


# ---------------------------------------------------------------- Python helpers, bound on first use

cdef bint _ready = False
cdef object _tn, _tq, _lid, _QualityIssue, _LidResult, _is_normalized
cdef object _URL_RE, _FILE_NAME_RE, _CAMERA_NAME_RE
cdef tuple _IMAGE_EXTENSIONS
cdef str _EMPTY_CAPTION, _CAPTION_FILTERED, _UNSUPPORTED_LANGUAGE
cdef double _MIN_LABEL_PROB
cdef dict _SHORT_LABELS = {}

# Chinese-script table: one byte per code point below _hanzi_size. It is 0 for characters that
# hanzidentifier does not know, else H_KNOWN plus a flag for each set that contains the character.
cdef enum:
    H_KNOWN = 1
    H_SHARED = 2
    H_TRADITIONAL = 4
    H_SIMPLIFIED = 8

cdef unsigned char *_hanzi_table = NULL
cdef Py_ssize_t _hanzi_size = 0


cdef int _init() except -1:
    global _ready, _tn, _tq, _lid, _QualityIssue, _LidResult, _is_normalized
    global _URL_RE, _FILE_NAME_RE, _CAMERA_NAME_RE, _IMAGE_EXTENSIONS
    global _EMPTY_CAPTION, _CAPTION_FILTERED, _UNSUPPORTED_LANGUAGE, _MIN_LABEL_PROB
    if _ready:
        return 0
    import unicodedata
    from bm6b.filters import lid, text_normalize, text_quality
    from bm6b.schemas.reasons import Reason

    _tn, _tq, _lid = text_normalize, text_quality, lid
    _QualityIssue = text_quality.QualityIssue
    _LidResult = lid.LidResult
    _is_normalized = unicodedata.is_normalized
    _URL_RE = text_quality._URL_RE
    _FILE_NAME_RE = text_quality._FILE_NAME_RE
    _CAMERA_NAME_RE = text_quality._CAMERA_NAME_RE
    _IMAGE_EXTENSIONS = tuple(text_quality.IMAGE_EXTENSIONS)
    _EMPTY_CAPTION = Reason.EMPTY_CAPTION.value
    _CAPTION_FILTERED = Reason.CAPTION_FILTERED.value
    _UNSUPPORTED_LANGUAGE = Reason.UNSUPPORTED_LANGUAGE.value
    _MIN_LABEL_PROB = lid._MIN_LABEL_PROB
    _ready = True
    return 0


cdef int _init_hanzi() except -1:
    global _hanzi_table, _hanzi_size
    cdef Py_ssize_t size, i
    cdef unsigned char *table
    if _hanzi_table != NULL:
        return 0
    known, shared, traditional, simplified = _lid._hanzi_sets()
    size = max(ord(ch) for ch in known) + 1 if known else 0
    table = <unsigned char *>malloc(size if size > 0 else 1)
    if table == NULL:
        raise MemoryError()
    memset(table, 0, size if size > 0 else 1)
    for flag, characters in ((H_KNOWN, known), (H_SHARED, shared), (H_TRADITIONAL, traditional),
                             (H_SIMPLIFIED, simplified)):
        for ch in characters:
            i = ord(ch)
            if i < size:
                table[i] |= flag
    _hanzi_size = size
    _hanzi_table = table
    return 0


# ---------------------------------------------------------------- normalization


def normalize_caption(text, config=None):
    """Return ``text_normalize.normalize_caption(text, config)``."""
    _init()
    if not isinstance(text, str) or not text:
        return ""
    config = config or _tn.DEFAULT_CONFIG
    return _normalize(text, config)


cdef str _normalize(object original, object config):
    cdef str text = original[: config.max_input_chars]
    cdef Py_ssize_t n = len(text), i
    cdef int kind = PyUnicode_KIND(text)
    cdef void *data = PyUnicode_DATA(text)
    cdef unsigned int c, previous = 0
    cdef bint spaces_change = False, stable = True

    if PyUnicode_IS_ASCII(text):
        for i in range(n):
            c = PyUnicode_READ(kind, data, i)
            if not (ASCII_FLAGS[c] & A_PRINTABLE) or c == 38 or c == 60:  # "&", "<"
                return _tn.normalize_caption_python(text, config)
            if c == 32 and (i == 0 or i == n - 1 or previous == 32):
                spaces_change = True
            previous = c
        if spaces_change:
            return " ".join(text.split())
        return text

    for i in range(n):
        c = PyUnicode_READ(kind, data, i)
        if c == 38 or c == 60 or is_space(c) or is_pre_nfkc(c):
            return _tn.normalize_caption_python(text, config)
        if stable and not is_nfkc_stable(c):
            # Chinese punctuation after Han, a closing bracket or 、。 stays as it is.
            if not (is_zh_punct(c) and i > 0 and (is_han(previous) or previous == 0xFF09
                                                  or previous == 0x3001 or previous == 0x3002)):
                stable = False
        previous = c
    if stable or _is_normalized("NFKC", text):
        return text
    return _tn.normalize_caption_python(text, config)


def normalize_record(dict record, config):
    """Apply ``captions.normalize_record``; ``config`` must not be None."""
    _init()
    record["caption_zh"] = _normalize_or_none(record.get("caption_zh"), config)
    record["caption_en"] = _normalize_or_none(record.get("caption_en"), config)
    cdef list normalized_captions = []
    for caption in record.get("captions") or []:
        caption = _normalize_or_none(caption, config)
        if caption:
            normalized_captions.append(caption)
    record["captions"] = normalized_captions
    if not (record["caption_zh"] or record["caption_en"] or record["captions"]):
        return record, (_EMPTY_CAPTION, "no caption left after normalization")
    return record, None


cdef object _normalize_or_none(object text, object config):
    if not isinstance(text, str) or not text:
        return None
    return _normalize(text, config) or None


# ---------------------------------------------------------------- junk rules


def junk_issue(str text):
    """Return ``text_quality.junk_issue(text)``."""
    _init()
    found = _junk(text)
    if found is None or isinstance(found, _QualityIssue):
        return found
    return _QualityIssue(*found)


cdef bint _ends_with_image_suffix(str text, int kind, void *data, Py_ssize_t n):
    # Case-insensitive for ASCII letters only, because the caller sends text with U+0130, U+0131,
    # U+017F or U+212A to the regex instead.
    cdef Py_ssize_t m, j
    cdef unsigned int c, e
    cdef str extension
    for extension in _IMAGE_EXTENSIONS:
        m = len(extension)
        if n < m + 1 or PyUnicode_READ(kind, data, n - m - 1) != 46:  # "."
            continue
        for j in range(m):
            c = PyUnicode_READ(kind, data, n - m + j)
            if 65 <= c <= 90:
                c += 32
            e = ord(extension[j])
            if c != e:
                break
        else:
            return True
    return False


cdef bint _is_slug(int kind, void *data, Py_ssize_t n):
    # text_quality._SLUG_RE: ASCII letters and digits in at least three parts joined by - or _.
    cdef Py_ssize_t i, separators = 0
    cdef unsigned int c
    cdef bint after_alnum = False
    for i in range(n):
        c = PyUnicode_READ(kind, data, i)
        if c < 128 and (ASCII_FLAGS[c] & A_WORD) and c != 95:
            after_alnum = True
        elif (c == 45 or c == 95) and after_alnum:
            separators += 1
            after_alnum = False
        else:
            return False
    return after_alnum and separators >= 2


cdef object _junk(str text):
    """Return None, a (rule, detail) tuple, or a QualityIssue from the Python rules."""
    cdef str stripped = text.strip()
    cdef Py_ssize_t n = len(stripped), i
    cdef int kind = PyUnicode_KIND(stripped)
    cdef void *data = PyUnicode_DATA(stripped)
    cdef unsigned int c, first
    cdef bint ascii = PyUnicode_IS_ASCII(stripped), has_space = False, has_letter = False
    cdef bint case_variant = False

    for i in range(n):
        c = PyUnicode_READ(kind, data, i)
        if c == 32:
            has_space = True
        elif not has_letter and is_letter(c):
            has_letter = True
        if c >= 128 and is_case_variant(c):
            case_variant = True

    if ascii and has_space:
        if _ends_with_image_suffix(stripped, kind, data, n):
            return ("file_name", "the caption is an image file name")
        if not has_letter:
            return ("no_letters", "the caption has only digits, spaces or symbols")
        return None

    if case_variant:
        return _tq.junk_issue_python(text)
    first = PyUnicode_READ(kind, data, 0) if n else 0
    if first in (72, 104, 87, 119) and _URL_RE.fullmatch(stripped):  # H h W w
        return ("url", "the caption is a URL")
    if _ends_with_image_suffix(stripped, kind, data, n) or (
            first in (73, 105, 68, 100, 80, 112, 77, 109, 86, 118, 83, 115)  # I D P M V S
            and _CAMERA_NAME_RE.match(stripped)):
        return ("file_name", "the caption is an image file name")
    if ascii and _is_slug(kind, data, n):
        return ("slug", "the caption is a URL slug of words joined by - or _")
    if not has_letter:
        return ("no_letters", "the caption has only digits, spaces or symbols")
    return None


# ---------------------------------------------------------------- literal gates


cdef inline unsigned int _gram_byte(unsigned int c) noexcept nogil:
    # ASCII letters lower-cased, other ASCII as it is, other characters folded into 128..255.
    if c < 128:
        return c + 32 if 65 <= c <= 90 else c
    return 128 | ((c * 0x9E3779B1U) >> 25)


cdef inline unsigned int _gram_slot(unsigned int gram) noexcept nogil:
    # A 16-bit slot of a 3- or 4-byte n-gram.
    return (gram * 0x9E3779B1U) >> 16


cdef class _Gate:
    """A ``literal_gate.LiteralGate`` with an n-gram pre-check in front of its Aho-Corasick pass.

    Every literal of the gate starts with one of the 2-, 3- or 4-character prefixes recorded in
    the bitmaps, so text in which no n-gram hits a bitmap contains no literal. Literal characters
    are ASCII (lower-cased) or uncased, and lower-casing a cased non-ASCII character never gives
    one of them, except for the four case variants that the caller checks first. So only the
    ASCII letters of the text need lower-casing here. A bitmap hit can come from two n-grams
    sharing a slot, so it goes on to the exact Aho-Corasick pass.
    """
    cdef bint enabled
    cdef object automaton
    cdef bint prefilter  # False when a literal is shorter than 2 characters
    cdef bint has_length[5]
    cdef unsigned char bitmaps[3][8192]  # 65536 slots for each n-gram length 2, 3 and 4

    @staticmethod
    cdef _Gate of(object gate):
        cdef _Gate result = _GATES.get(gate)
        if result is not None:
            return result
        result = _Gate.__new__(_Gate)
        result.enabled = gate.enabled
        result.automaton = gate._automaton
        result._add_literals()
        if len(_GATES) >= 64:
            _GATES.clear()
        _GATES[gate] = result
        return result

    cdef void _add_literals(self):
        cdef unsigned int gram, slot
        cdef Py_ssize_t n, i
        cdef str literal
        memset(self.bitmaps, 0, sizeof(self.bitmaps))
        memset(self.has_length, 0, sizeof(self.has_length))
        self.prefilter = self.automaton is not None
        if not self.prefilter:
            return
        for literal in self.automaton.keys():
            if len(literal) < 2:
                self.prefilter = False
                return
            n = min(len(literal), 4)
            gram = 0
            for i in range(n):
                gram = (gram << 8) | _gram_byte(ord(literal[i]))
            slot = gram if n == 2 else _gram_slot(gram)
            self.bitmaps[n - 2][slot >> 3] |= 1 << (slot & 7)
            self.has_length[n] = True

    cdef bint may_contain_literal(self, str text):
        """Return False only when no literal's prefix n-gram occurs in text (case-insensitively for ASCII)."""
        cdef Py_ssize_t n = len(text), i
        cdef int kind = PyUnicode_KIND(text)
        cdef void *data = PyUnicode_DATA(text)
        cdef unsigned int gram = 0, slot
        cdef bint two = self.has_length[2], three = self.has_length[3], four = self.has_length[4]
        if not self.prefilter:
            return True
        # The n-grams that start before the text contain zero bytes; a hit on one is only a false alarm.
        for i in range(n):
            gram = (gram << 8) | _gram_byte(PyUnicode_READ(kind, data, i))
            if two:
                slot = gram & 0xFFFF
                if self.bitmaps[0][slot >> 3] & (1 << (slot & 7)):
                    return True
            if three:
                slot = _gram_slot(gram & 0xFFFFFF)
                if self.bitmaps[1][slot >> 3] & (1 << (slot & 7)):
                    return True
            if four:
                slot = _gram_slot(gram)
                if self.bitmaps[2][slot >> 3] & (1 << (slot & 7)):
                    return True
        return False


cdef dict _GATES = {}


cdef bint _may_match(_Gate gate, str text, bint case_variant):
    # Return LiteralGate.may_match(text). ``case_variant`` tells whether text has U+0130, U+0131,
    # U+017F or U+212A.
    if not gate.enabled or case_variant:
        return True
    if gate.automaton is None:
        return False
    if not gate.may_contain_literal(text):
        return False
    for _ in gate.automaton.iter(text.lower()):
        return True
    return False


def literal_gate_may_match(gate, str text):
    """Return ``gate.may_match(text)`` for a ``literal_gate.LiteralGate``, through the n-gram pre-check."""
    return _may_match(_Gate.of(gate), text, _has_case_variant(text))


cdef bint _has_case_variant(str text):
    cdef Py_ssize_t i, n = len(text)
    cdef int kind = PyUnicode_KIND(text)
    cdef void *data = PyUnicode_DATA(text)
    if PyUnicode_IS_ASCII(text):
        return False
    for i in range(n):
        if is_case_variant(PyUnicode_READ(kind, data, i)):
            return True
    return False


# ---------------------------------------------------------------- settings of one call


cdef class _Settings:
    """The CaptionConfig fields the compiled rules read, taken once per call.

    NOTE: thresholds are compared as C doubles. That matches Python for int and float values, but
    a Decimal or Fraction threshold could compare differently when a count or share equals it.
    """
    cdef object config
    cdef tuple zh_labels
    cdef object min_lid_confidence, default_min_lid_confidence
    cdef object en_min
    cdef double en_min_value
    cdef double han_script_override, mixed_second_min, mixed_script_min_share, column_override_confidence
    cdef bint strip_boilerplate, convert_traditional
    # Built on first use, so a missing list file raises where the Python rules would read it.
    cdef _Gate _boilerplate_gate, _blocklist_gate
    cdef object min_zh_chars, max_zh_chars, min_en_words, min_en_chars, max_en_words
    cdef object max_special_char_ratio, max_repeated_word_ratio, min_words_for_repeat_check
    cdef double min_zh_chars_value, max_zh_chars_value, min_en_words_value, min_en_chars_value
    cdef double max_en_words_value, max_special_char_ratio_value, max_repeated_word_ratio_value
    cdef double min_words_for_repeat_check_value
    cdef object max_char_run
    cdef Py_ssize_t max_char_run_value  # -1 when max_char_run is not a non-negative int

    cdef _Gate boilerplate_gate(self):
        if self._boilerplate_gate is None:
            self._boilerplate_gate = _Gate.of(_tq._boilerplate_gate(tuple(self.config.boilerplate_files)))
        return self._boilerplate_gate

    cdef _Gate blocklist_gate(self):
        if self._blocklist_gate is None:
            self._blocklist_gate = _Gate.of(_tq._blocklist_gate_of(self.config))
        return self._blocklist_gate


cdef object _min_confidence(_Settings s, str label, str slot):
    minimums = s.min_lid_confidence
    if label in minimums:
        return minimums[label]
    return minimums.get(slot, s.default_min_lid_confidence)


cdef _Settings _settings(object config):
    cdef _Settings s = _Settings.__new__(_Settings)
    s.config = config
    s.zh_labels = tuple(config.zh_labels)
    if not s.zh_labels:
        # Read unchecked below (boundscheck is off); CaptionConfig already rejects this.
        raise ValueError("zh_labels is empty: name at least one fastText label for Chinese, such as 'zh'")
    s.min_lid_confidence = config.min_lid_confidence
    s.default_min_lid_confidence = config.default_min_lid_confidence
    s.en_min = _min_confidence(s, "en", "en")
    s.en_min_value = s.en_min
    s.han_script_override = config.han_script_override
    s.mixed_second_min = config.mixed_second_min
    s.mixed_script_min_share = config.mixed_script_min_share
    s.column_override_confidence = config.column_override_confidence
    s.strip_boilerplate = config.strip_boilerplate
    s.convert_traditional = config.convert_traditional

    s.min_zh_chars = config.min_zh_chars
    s.max_zh_chars = config.max_zh_chars
    s.min_en_words = config.min_en_words
    s.min_en_chars = config.min_en_chars
    s.max_en_words = config.max_en_words
    s.max_special_char_ratio = config.max_special_char_ratio
    s.max_repeated_word_ratio = config.max_repeated_word_ratio
    s.min_words_for_repeat_check = config.min_words_for_repeat_check
    s.min_zh_chars_value = s.min_zh_chars
    s.max_zh_chars_value = s.max_zh_chars
    s.min_en_words_value = s.min_en_words
    s.min_en_chars_value = s.min_en_chars
    s.max_en_words_value = s.max_en_words
    s.max_special_char_ratio_value = s.max_special_char_ratio
    s.max_repeated_word_ratio_value = s.max_repeated_word_ratio
    s.min_words_for_repeat_check_value = s.min_words_for_repeat_check
    s.max_char_run = config.max_char_run
    s.max_char_run_value = s.max_char_run if type(s.max_char_run) is int and s.max_char_run >= 0 else -1
    return s


# ---------------------------------------------------------------- content rules


cdef struct Counts:
    Py_ssize_t length
    Py_ssize_t han  # Han characters
    Py_ssize_t letters  # regex [^\W\d_]
    Py_ssize_t zh_words  # runs of [A-Za-z0-9\u00c0-\u024f]
    Py_ssize_t lid_words  # runs of [A-Za-z\u00c0-\u024f]
    Py_ssize_t words  # str.split() parts
    Py_ssize_t nonspace
    Py_ssize_t special  # text_quality._SPECIAL_RE
    bint kana_hangul
    bint case_variant
    bint ascii


cdef void _count(str text, Counts *out):
    cdef Py_ssize_t n = len(text), i
    cdef int kind = PyUnicode_KIND(text)
    cdef void *data = PyUnicode_DATA(text)
    cdef unsigned int c
    cdef unsigned char flags
    cdef bint in_zh_word = False, in_lid_word = False, in_word = False, zh_char, lid_char, space
    memset(out, 0, sizeof(Counts))
    out.length = n
    out.ascii = PyUnicode_IS_ASCII(text)
    for i in range(n):
        c = PyUnicode_READ(kind, data, i)
        if c < 128:
            flags = ASCII_FLAGS[c]
            space = flags & A_SPACE
            lid_char = flags & A_LETTER
            zh_char = lid_char or (flags & A_DIGIT)
            if lid_char:
                out.letters += 1
            if not (flags & (A_WORD | A_SPACE | A_PUNCT)):
                out.special += 1
        else:
            space = Py_UNICODE_ISSPACE(c)
            lid_char = is_latin_extended(c)
            zh_char = lid_char
            if is_han(c):
                out.han += 1
            elif is_kana_hangul(c):
                out.kana_hangul = True
            elif is_case_variant(c):
                out.case_variant = True
            if Py_UNICODE_ISALNUM(c):
                if not Py_UNICODE_ISDECIMAL(c):
                    out.letters += 1
            elif not space and not is_sentence_punct(c):
                out.special += 1
        if zh_char and not in_zh_word:
            out.zh_words += 1
        in_zh_word = zh_char
        if lid_char and not in_lid_word:
            out.lid_words += 1
        in_lid_word = lid_char
        if not space:
            out.nonspace += 1
            if not in_word:
                out.words += 1
        in_word = not space


cdef object _content(str text, str language, _Settings s, Counts *counts):
    """Return ``text_quality.content_issue`` as None, a (rule, detail) tuple or a QualityIssue."""
    cdef bint han_text, zh_length
    cdef Py_ssize_t n
    cdef double ratio

    if _may_match(s.blocklist_gate(), text, counts.case_variant):
        issue = _tq.blocklist_issue(text, s.config)
        if issue:
            return issue

    han_text = counts.han > 0 and counts.letters > 0 and 2 * counts.han >= counts.letters

    zh_length = language in s.zh_labels or (language != "en" and han_text)
    if zh_length:
        n = counts.han + counts.zh_words
        if n < s.min_zh_chars_value:
            return ("too_short", f"{n} Chinese characters and words < {s.min_zh_chars}")
        if n > s.max_zh_chars_value:
            return ("too_long", f"{n} Chinese characters and words > {s.max_zh_chars}")
    else:
        if counts.words < s.min_en_words_value:
            return ("too_short", f"{counts.words} words < {s.min_en_words}")
        if counts.nonspace < s.min_en_chars_value:
            return ("too_short", f"{counts.nonspace} characters < {s.min_en_chars}")
        if counts.words > s.max_en_words_value:
            return ("too_long", f"{counts.words} words > {s.max_en_words}")

    ratio = (<double>counts.special / <double>counts.nonspace) if counts.nonspace else 0.0
    if ratio > s.max_special_char_ratio_value:
        return ("special_chars", f"special-character ratio {ratio:.2f} > {s.max_special_char_ratio}")

    return _repetition(text, s, counts, han_text)


cdef object _char_run(str text, Py_ssize_t max_run):
    """Return the first run of one character (not a digit or space) longer than max_run, or None."""
    cdef Py_ssize_t n = len(text), i = 0, j
    cdef int kind = PyUnicode_KIND(text)
    cdef void *data = PyUnicode_DATA(text)
    cdef unsigned int c
    while i < n:
        c = PyUnicode_READ(kind, data, i)
        j = i + 1
        while j < n and PyUnicode_READ(kind, data, j) == c:
            j += 1
        if j - i > max_run and not is_decimal(c) and not is_space(c):
            return text[i:j]
        i = j
    return None


# The max number of tokens or Han characters compared pairwise. Longer texts go to the Python rule,
# which counts distinct tokens with a set.
cdef enum:
    _MAX_COMPARED = 512


cdef Py_ssize_t _distinct_han_starts(str text, Py_ssize_t han) except -2:
    """Return len(set(h[:-1])) for h the Han characters of text, or -1 when there are too many to compare."""
    cdef Py_ssize_t n = len(text), i, j, k = 0, distinct = 0
    cdef int kind = PyUnicode_KIND(text)
    cdef void *data = PyUnicode_DATA(text)
    cdef unsigned int c
    cdef unsigned int chars[_MAX_COMPARED]
    if han - 1 > _MAX_COMPARED:
        return -1
    for i in range(n):
        c = PyUnicode_READ(kind, data, i)
        if is_han(c):
            if k == han - 1:
                break
            chars[k] = c
            k += 1
    for i in range(k):
        for j in range(i):
            if chars[j] == chars[i]:
                break
        else:
            distinct += 1
    return distinct


cdef struct Token:
    Py_ssize_t start
    Py_ssize_t length
    unsigned long long hash


cdef object _ascii_token_ratio(str text, Py_ssize_t *n_tokens):
    """Return the repeated-token share of ASCII text (tokens: \\w+ after lower-casing), or None when too many tokens."""
    cdef Py_ssize_t n = len(text), i, j, k, count = 0, distinct = 0, start = -1
    cdef int kind = PyUnicode_KIND(text)
    cdef void *data = PyUnicode_DATA(text)
    cdef unsigned int c, d
    cdef unsigned long long h = 0
    cdef Token *tokens
    cdef bint same
    tokens = <Token *>malloc((n // 2 + 1) * sizeof(Token))
    if tokens == NULL:
        raise MemoryError()
    try:
        for i in range(n + 1):
            c = PyUnicode_READ(kind, data, i) if i < n else 32
            if ASCII_FLAGS[c] & A_WORD:
                if 65 <= c <= 90:
                    c += 32
                if start < 0:
                    start = i
                    h = 1469598103934665603ULL
                h = (h ^ c) * 1099511628211ULL
            elif start >= 0:
                tokens[count].start = start
                tokens[count].length = i - start
                tokens[count].hash = h
                count += 1
                start = -1
        for i in range(count if count <= _MAX_COMPARED else 0):
            for j in range(i):
                if tokens[j].hash != tokens[i].hash or tokens[j].length != tokens[i].length:
                    continue
                same = True
                for k in range(tokens[i].length):
                    c = PyUnicode_READ(kind, data, tokens[i].start + k)
                    d = PyUnicode_READ(kind, data, tokens[j].start + k)
                    if 65 <= c <= 90:
                        c += 32
                    if 65 <= d <= 90:
                        d += 32
                    if c != d:
                        same = False
                        break
                if same:
                    break
            else:
                distinct += 1
    finally:
        free(tokens)
    n_tokens[0] = count
    if count > _MAX_COMPARED:
        return None
    if count == 0:
        return 0.0
    return 1.0 - <double>distinct / <double>count


cdef object _repetition(str text, _Settings s, Counts *counts, bint han_text):
    cdef Py_ssize_t n_tokens, distinct
    cdef double ratio
    if s.max_char_run_value < 0:
        return _tq.repetition_issue(text, s.config)
    if counts.length > s.max_char_run_value:
        run = _char_run(text, s.max_char_run_value)
        if run is not None:
            return ("char_run", f"{run[:20]!r} repeats one character more than {s.max_char_run} times")

    if han_text and counts.han >= 2:
        n_tokens = counts.han - 1
        if n_tokens < s.min_words_for_repeat_check_value:
            return None
        distinct = _distinct_han_starts(text, counts.han)
        if distinct >= 0 and 1.0 - <double>distinct / <double>n_tokens <= s.max_repeated_word_ratio_value:
            return None

    ratio_object = _ascii_token_ratio(text, &n_tokens) if counts.ascii else None
    if ratio_object is not None:
        ratio = ratio_object
    else:
        han = _tq._NON_HAN_RE.sub("", text) if counts.han else ""
        ratio_object, n_tokens = _tq._repeated_word_ratio(text, han, han_text)
        ratio = ratio_object
    if n_tokens >= s.min_words_for_repeat_check_value and ratio > s.max_repeated_word_ratio_value:
        return ("repeated_words", f"{ratio_object:.2f} of {n_tokens} tokens repeat > {s.max_repeated_word_ratio}")
    return None


def content_issue(str text, str language, config):
    """Return ``text_quality.content_issue(text, language, config)``."""
    _init()
    cdef Counts counts
    _count(text, &counts)
    found = _content(text, language, _settings(config), &counts)
    if found is None or isinstance(found, _QualityIssue):
        return found
    return _QualityIssue(*found)


# ---------------------------------------------------------------- language ID


@cython.final
cdef class _Lid:
    """The fields of a ``lid.LidResult``. One instance serves every caption of a batch, so
    language ID allocates no result object per caption."""
    cdef object label, score, slot, second_label
    cdef double score_value, second_score
    cdef bint mixed


cdef int _identify(str text, list labels, list probabilities, _Settings s, Counts *counts, _Lid out,
                   dict probs) except -1:
    """Apply ``lid.identify_from_labels`` and write the result to ``out``.

    ``labels`` and ``probabilities`` are the model's labels and probabilities in the model's
    order. ``probs``, when given, is the caller's dict, changed in place as the Python rule does.
    """
    cdef Py_ssize_t n = len(labels), i, top = -1, second = -1
    cdef double han_share = 0.0, latin_share = 0.0, total, zh_score = 0.0, zh_label_score = -1.0
    cdef double en_score = 0.0, p, zh_min_value, best
    cdef bint zh_raised = False, drop_ja = False, zh_ok, en_ok
    cdef str label, zh_label, candidate
    cdef object slot = None, score, en_object = 0.0

    total = counts.han + counts.lid_words
    if total > 0:
        han_share = counts.han / total
        latin_share = counts.lid_words / total

    zh_label = s.zh_labels[0]
    for candidate in s.zh_labels:
        p = 0.0
        for i in range(n):
            if labels[i] == candidate:
                p = probabilities[i]
                break
        zh_score += p
        if p > zh_label_score:
            zh_label, zh_label_score = candidate, p
    zh_min = _min_confidence(s, zh_label, "zh")
    zh_min_value = zh_min
    if han_share > 0.0 and not counts.kana_hangul:
        for i in range(n):
            if labels[i] == "ja":
                zh_score += <double>probabilities[i]
                drop_ja = True
                break
        if han_share >= s.han_script_override and zh_min_value > zh_score:
            zh_score = zh_min_value
            zh_raised = True
    elif han_share == 0.0:
        zh_score = 0.0
    if latin_share > 0.0:
        for i in range(n):
            if labels[i] == "en":
                en_object = probabilities[i]
                break
        en_score = en_object

    # The merged ranking: labels other than the Chinese ones (and "ja" when it joined the Chinese
    # score) in the model's order, then the top Chinese label with the summed score.
    best = 0.0
    for i in range(n):
        label = labels[i]
        if (drop_ja and label == "ja") or label in s.zh_labels:
            continue
        p = probabilities[i]
        if top < 0 or p > best:
            top, best = i, p
    zh_object = (zh_min if zh_raised else zh_score) if zh_score > 0.0 else None
    if zh_score > 0.0 and (top < 0 or zh_score > best):
        label, score = zh_label, zh_object
    elif top >= 0:
        label, score = labels[top], probabilities[top]
    else:
        label, score = "unknown", 0.0

    zh_ok = zh_score >= zh_min_value
    en_ok = en_score >= s.en_min_value
    if zh_ok and (not en_ok or zh_score >= en_score):
        slot, label, score = "zh", zh_label, (zh_min if zh_raised else zh_score)
    elif en_ok:
        slot, label, score = "en", "en", en_object

    second_label = None
    out.second_score = 0.0
    for i in range(n):
        candidate = labels[i]
        if (drop_ja and candidate == "ja") or candidate in s.zh_labels or candidate == label:
            continue
        p = probabilities[i]
        if second < 0 or p > out.second_score:
            second, out.second_score = i, p
    if second >= 0:
        second_label = labels[second]
    if zh_score > 0.0 and zh_label != label and (second < 0 or zh_score > out.second_score):
        second_label = zh_label
        out.second_score = zh_score

    out.label, out.score, out.slot, out.second_label = label, score, slot, second_label
    out.score_value = score
    out.mixed = min(zh_score, en_score) >= s.mixed_second_min or (
        han_share >= s.mixed_script_min_share and latin_share >= s.mixed_script_min_share)

    if probs is not None:
        if drop_ja:
            del probs["ja"]
        if zh_score > 0.0 and probs.keys().isdisjoint(s.zh_labels):
            probs[zh_label] = zh_object
    return 0


def identify_from_labels(str text, dict probs, config):
    """Return ``lid.identify_from_labels(text, probs, config)``, changing ``probs`` the same way."""
    _init()
    cdef Counts counts
    cdef _Lid result = _Lid.__new__(_Lid)
    _count(text, &counts)
    _identify(text, list(probs), list(probs.values()), _settings(config), &counts, result, probs)
    return _LidResult(result.label, result.score, result.slot, result.mixed, result.second_label,
                      result.second_score)


def script_shares(str text):
    """Return ``lid.script_shares(text)``."""
    cdef Counts counts
    cdef double total
    _count(text, &counts)
    total = counts.han + counts.lid_words
    if total == 0:
        return 0.0, 0.0, counts.kana_hangul
    return counts.han / total, counts.lid_words / total, counts.kana_hangul


cdef object _predict(str text, object native):
    """Return the native fastText predictions (probability, "__label__xx") of one caption."""
    if "\n" in text:
        text = text.replace("\n", " ")
    if text.isupper():
        text = text.lower()
    try:
        return native.predict(text + "\n", -1, _MIN_LABEL_PROB, "strict")
    except TypeError:
        # pybind11 raises TypeError for a str it cannot encode as UTF-8 (lone surrogates).
        return native.predict(_lid._encodable(text) + "\n", -1, _MIN_LABEL_PROB, "strict")


cdef str _short_label(str label):
    short = _SHORT_LABELS.get(label)
    if short is None:
        short = label[9:]
        if len(_SHORT_LABELS) < 1024:
            _SHORT_LABELS[label] = short
    return short


def predict_labels(str text, model):
    """Return ``lid.predict_labels(text, model)``; ``model`` must not be None."""
    _init()
    native = getattr(model, "f", None)
    if native is None:
        return _lid.predict_labels_python(text, model)
    return {_short_label(label): p for p, label in _predict(text, native)}


# ---------------------------------------------------------------- Chinese script


def chinese_script(str text):
    """Return ``lid.chinese_script(text)``."""
    _init()
    return _chinese_script(text)


cdef str _chinese_script(str text):
    _init_hanzi()
    cdef Py_ssize_t n = len(text), i
    cdef int kind = PyUnicode_KIND(text)
    cdef void *data = PyUnicode_DATA(text)
    cdef unsigned int c
    cdef unsigned char flags, common = H_SHARED | H_TRADITIONAL | H_SIMPLIFIED
    cdef bint known = False
    if PyUnicode_IS_ASCII(text):
        return _lid.NO_HAN
    for i in range(n):
        c = PyUnicode_READ(kind, data, i)
        if c < <Py_UCS4>_hanzi_size:
            flags = _hanzi_table[c]
            if flags:
                known = True
                common &= flags
    if not known:
        return _lid.NO_HAN
    if common & H_SHARED:
        return _lid.BOTH
    if common & H_TRADITIONAL:
        return _lid.TRADITIONAL
    if common & H_SIMPLIFIED:
        return _lid.SIMPLIFIED
    return _lid.MIXED


# ---------------------------------------------------------------- records


cdef tuple _SLOTS = (("zh", "caption_zh", "lid_zh", "lid_zh_score", "lid_zh_mixed"),
                     ("en", "caption_en", "lid_en", "lid_en_score", "lid_en_mixed"))


@cython.final
@cython.no_gc
cdef class _Candidate:
    """One caption of a record on its way through ``assign_languages_batch``.

    Not tracked by the garbage collector, because it refers only to strings and to the model's
    prediction list, never back to itself. A batch makes two of these per record, and untracked
    objects do not count towards the allocations that start a collection.
    """
    cdef object column_slot  # "zh" or "en" for a caption from that column, else None
    cdef object text
    cdef object stripped  # the text after boilerplate removal, or None when the caption was dropped
    cdef object issue  # why the caption was dropped, or None
    cdef object predictions  # native fastText predictions, or the dict of lid.predict_labels_python


cdef _Candidate _candidate(object column_slot, object text):
    cdef _Candidate candidate = _Candidate.__new__(_Candidate)
    candidate.column_slot = column_slot
    candidate.text = text
    return candidate


cdef list _prepare_candidates(dict record, _Settings s):
    """Apply ``captions._prepare_candidates``."""
    cdef list candidates = []
    cdef str slot, caption_key, label_key, score_key
    cdef _Candidate candidate
    for slot, caption_key, label_key, score_key, _ in _SLOTS:
        text = record.get(caption_key)
        if text:
            candidates.append(_candidate(slot, text))
        record[caption_key] = None
        record[label_key] = None
        record[score_key] = None
    for text in record.pop("captions", None) or []:
        candidates.append(_candidate(None, text))
    record["captions"] = []

    for candidate in candidates:
        text = candidate.text
        if type(text) is not str:
            # Let the Python rules raise or decide on other types.
            issue = _tq.junk_issue_python(text)
        else:
            issue = _junk(text)
        if issue is not None:
            candidate.issue = f"{candidate.column_slot or 'caption'}: {_issue_text(issue)}"
            continue
        stripped = text
        if s.strip_boilerplate:
            if type(text) is not str or _may_match(s.boilerplate_gate(), text, _has_case_variant(text)):
                stripped = _tq.strip_boilerplate(text, s.config)
            if not stripped:
                candidate.issue = f"{candidate.column_slot or 'caption'}: boilerplate: only boilerplate phrases and URLs"
                continue
        candidate.stripped = stripped
    return candidates


cdef str _issue_text(object issue):
    if isinstance(issue, tuple):
        return f"{issue[0]}: {issue[1]}"
    return str(issue)


cdef tuple _fill_slots(dict record, list candidates, _Settings s, _Lid lid, list labels, list probabilities):
    """Apply ``captions._fill_slots``; ``lid``, ``labels`` and ``probabilities`` are scratch space."""
    cdef list unplaced = None, issues = None
    cdef Counts counts
    cdef _Candidate candidate
    for candidate in candidates:
        column_slot, text, stripped = candidate.column_slot, candidate.text, candidate.stripped
        if stripped is None:
            if issues is None:
                issues = []
            issues.append(candidate.issue)
            continue
        found = candidate.predictions
        candidate.predictions = None
        if isinstance(found, dict):
            labels, probabilities = list(found), list(found.values())
        else:
            del labels[:]
            del probabilities[:]
            for p, full_label in found:
                labels.append(_short_label(full_label))
                probabilities.append(p)

        # A str subclass is placed as it is, but the rules read an exact str copy.
        exact = stripped if type(stripped) is str else stripped[:]
        _count(exact, &counts)
        _identify(exact, labels, probabilities, s, &counts, lid, None)
        slot = lid.slot
        if slot is None and column_slot is not None and lid.score_value < s.column_override_confidence:
            slot = column_slot
        if slot is None or record[("caption_zh" if slot == "zh" else "caption_en")]:
            prefix = f"{column_slot} column " if column_slot else ""
            if unplaced is None:
                unplaced = []
            unplaced.append(f"{prefix}detected {lid.label}:{lid.score:.2f}")
            continue

        quality = _junk(exact) if stripped != text else None
        if quality is None:
            quality = _content(exact, lid.label, s, &counts)
        if quality is not None:
            if issues is None:
                issues = []
            issues.append(f"{slot}: {_issue_text(quality)}")
            continue
        if slot == "zh":
            record["caption_zh"] = stripped
            record["lid_zh"] = lid.label
            record["lid_zh_score"] = lid.score
            record["lid_zh_mixed"] = lid.mixed
        else:
            record["caption_en"] = stripped
            record["lid_en"] = lid.label
            record["lid_en_score"] = lid.score
            record["lid_en_mixed"] = lid.mixed

    zh = record.get("caption_zh")
    if zh:
        script = _chinese_script(zh if type(zh) is str else zh[:])
        if s.convert_traditional and (script == _lid.TRADITIONAL or script == _lid.MIXED):
            converted, script, original = _lid.normalize_script(zh, s.config)
        else:
            converted, original = zh, None
        record["caption_zh"] = converted
        record["zh_script"] = script
        record["caption_zh_original"] = original

    if issues is None:
        record["caption_issues"] = unplaced if unplaced is not None else []
    else:
        record["caption_issues"] = issues + unplaced if unplaced is not None else issues
    if record.get("caption_zh") or record.get("caption_en"):
        return record, None
    if issues is not None:
        return record, (_CAPTION_FILTERED, "; ".join(record["caption_issues"]))
    return record, (_UNSUPPORTED_LANGUAGE, "; ".join(unplaced) if unplaced is not None else "")


def assign_languages_batch(records, model, config):
    """Apply ``captions.assign_languages_batch``; ``model`` and ``config`` must not be None."""
    _init()
    cdef _Settings s = _settings(config)
    cdef list prepared = [_prepare_candidates(record, s) for record in records]
    cdef _Candidate candidate
    native = getattr(model, "f", None)
    for candidates in prepared:
        for candidate in candidates:
            if candidate.issue is not None:
                continue
            if native is not None and type(candidate.stripped) is str:
                candidate.predictions = _predict(candidate.stripped, native)
            else:
                candidate.predictions = _lid.predict_labels_python(candidate.stripped, model)
    cdef _Lid lid = _Lid.__new__(_Lid)
    cdef list labels = [], probabilities = []
    return [_fill_slots(record, candidates, s, lid, labels, probabilities)
            for record, candidates in zip(records, prepared)]
