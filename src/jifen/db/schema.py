"""The whole schema: importing this registers every domain's tables on the shared metadata."""

from jifen.db.base import metadata
from jifen.members import models as _members  # noqa: F401  (registers tables)
from jifen.points import models as _points  # noqa: F401
from jifen.programs import models as _programs  # noqa: F401

__all__ = ["metadata"]
