"""CSV imports of events, orders and members."""

BATCH = 500
"""Records an import commits a transaction unless told otherwise (kept here, out of the
service, so that the command line can show it without loading the service)."""
