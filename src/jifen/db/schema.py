"""The whole schema: importing this registers every domain's tables on the shared metadata."""

from jifen.api import models as _api  # noqa: F401  (registers tables)
from jifen.approvals import models as _approvals  # noqa: F401
from jifen.audit import models as _audit  # noqa: F401
from jifen.auth import models as _auth  # noqa: F401
from jifen.db.base import metadata
from jifen.events import models as _events  # noqa: F401
from jifen.jobs import models as _jobs  # noqa: F401
from jifen.members import models as _members  # noqa: F401
from jifen.notify import models as _notify  # noqa: F401
from jifen.points import models as _points  # noqa: F401
from jifen.programs import models as _programs  # noqa: F401
from jifen.rewards import models as _rewards  # noqa: F401
from jifen.rules import models as _rules  # noqa: F401
from jifen.tiers import models as _tiers  # noqa: F401

__all__ = ["metadata"]
