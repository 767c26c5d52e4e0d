"""Every error jifen raises on purpose, in one place.

    JifenError                      code, English and Chinese message
    ├── InvalidInput                the request is malformed; nothing was looked up
    │   ├── NonPositiveAmount
    │   ├── InvalidDates
    │   ├── MissingReason
    │   └── SameAccount
    ├── NotFound
    │   ├── UnknownMember
    │   ├── UnknownPosting
    │   └── UnknownProgram
    ├── Refused                     well-formed, but the rules forbid it now
    │   ├── InsufficientPoints
    │   ├── ExceedsOriginal         refund / reversal / unfreeze larger than what is open
    │   ├── IdempotencyConflict     a key reused for a different request
    │   └── DuplicateReference
    └── LedgerCorrupt               stored history contradicts itself

The root and the ledger's own errors live in :mod:`jifen.ledger.errors` so that the pure
core needs nothing else from jifen; this module is where everyone else imports them from.
"""

from jifen.ledger.errors import (
    DuplicateReference,
    ExceedsOriginal,
    IdempotencyConflict,
    InsufficientPoints,
    InvalidDates,
    InvalidInput,
    JifenError,
    LedgerCorrupt,
    MissingReason,
    NonPositiveAmount,
    NotFound,
    Refused,
    SameAccount,
    UnknownMember,
    UnknownPosting,
    UnknownProgram,
)

__all__ = [
    "DuplicateReference",
    "ExceedsOriginal",
    "IdempotencyConflict",
    "InsufficientPoints",
    "InvalidDates",
    "InvalidInput",
    "JifenError",
    "LedgerCorrupt",
    "MissingReason",
    "NonPositiveAmount",
    "NotFound",
    "Refused",
    "SameAccount",
    "UnknownMember",
    "UnknownPosting",
    "UnknownProgram",
]
