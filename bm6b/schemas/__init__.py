"""The one record schema shared by every stage, the rejects schema and the reason codes."""

from bm6b.schemas.reasons import REASONS, Reason, is_retryable
from bm6b.schemas.record import (
    RECORD_SCHEMA,
    REJECT_SCHEMA,
    SCHEMA_VERSION,
    make_key,
    make_reject,
    make_uid,
    new_record,
    normalize_url,
    record_to_row,
)

__all__ = [
    "REASONS",
    "RECORD_SCHEMA",
    "REJECT_SCHEMA",
    "SCHEMA_VERSION",
    "Reason",
    "is_retryable",
    "make_key",
    "make_reject",
    "make_uid",
    "new_record",
    "normalize_url",
    "record_to_row",
]
