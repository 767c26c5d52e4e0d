"""Members of a programme. Minimal for now: what the ledger needs to own an account."""
