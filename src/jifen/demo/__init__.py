"""The demo programme that `jifen demo` builds on the embedded database."""

DAYS = 365
"""Days of history the demo is built with unless told otherwise (kept here, out of the
service, so that the command line can show it without loading the service)."""
