"""Points: the stored ledger (accounts, postings, lines, lots) and its use cases."""
