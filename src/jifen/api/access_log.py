"""The server's access log, whatever server runs the app: its query values are masked.

uvicorn writes a line per request with the path and its query string on the logger
``uvicorn.access``; a member search carries a phone number or a reference there. The filter
is put on that logger by the app itself (:func:`hide_query_values`, which ``create_app``
calls), not by one command's logging configuration: ``jifen serve`` and ``jifen demo``, a
``uvicorn --factory jifen.api.app:app_from_settings`` of another deployment and the tests
all log the same way. (A filter on a logger stays when logging is configured again.)
"""

from __future__ import annotations

import logging
import re

ACCESS_LOGGER = "uvicorn.access"

_QUERY_NAME = re.compile(r"[A-Za-z_]{1,32}")


class QueryValuesHidden(logging.Filter):
    """Writes an access-log line with its query values masked (``?phone=***&limit=***``):
    a member search carries a phone number or a reference there, which the log would
    otherwise keep in clear. A name that is not a plain word is masked too."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        # uvicorn logs (client, method, path with query, HTTP version, status)
        if isinstance(args, tuple) and len(args) == 5 and "?" in str(args[2]):
            path, _, query = str(args[2]).partition("?")
            names = (part.partition("=")[0] for part in query.split("&") if part)
            hidden = "&".join(
                f"{name}=***" if _QUERY_NAME.fullmatch(name) else "***" for name in names
            )
            record.args = (*args[:2], f"{path}?{hidden}", *args[3:])
        return True


def hide_query_values() -> None:
    """Put :class:`QueryValuesHidden` on the access logger, once per process."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(f, QueryValuesHidden) for f in logger.filters):
        logger.addFilter(QueryValuesHidden())
