"""schemathesis generates requests for every operation in ``/openapi.json``: none may get
a 5xx, and every answer must match the document (status, content type, body schema).

Requests are sent as a super administrator, so they reach the handlers; about half of them
have their ``{program}`` and ``{member_id}`` set to ones that exist, so that generated
bodies get past "not found" and meet the real validation and the real ledger.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import get_client
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from jifen.api.app import create_app
from jifen.db.uow import Database
from jifen.points import service as points
from tests.api import support
from tests.api.conftest import api_settings
from tests.factories import new_members, new_program

EXAMPLES_PER_OPERATION = 15
MINIMUM_REQUESTS = 1000
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def test_generated_requests_get_no_5xx_and_answers_match_the_schema(db: Database) -> None:
    program = new_program(db)
    members = new_members(db, program.id, 3)
    for member_id in members:  # something to spend, refund and look at
        db.run(lambda uow, m=member_id: points.earn(uow, member_id=m, amount=500, key=f"seed-{m}"))
    app = create_app(db, api_settings())
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    admin = support.staff(db, "super_admin")
    real: dict[str, Any] = {"program": program.code}
    sent: list[str] = []
    failures: list[str] = []

    # One client for the run (the app's lifespan once), not one per request.
    with TestClient(app, raise_server_exceptions=False), get_client(app) as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            label = operation.label

            @settings(
                max_examples=EXAMPLES_PER_OPERATION,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            @given(
                case=operation.as_strategy(), use_real=st.booleans(), pick=st.sampled_from(members)
            )
            def exercise(case: Any, use_real: bool, pick: int) -> None:
                if use_real and case.path_parameters:
                    for name in case.path_parameters:
                        if name in real:
                            case.path_parameters[name] = real[name]
                        elif name == "member_id":
                            case.path_parameters[name] = pick
                response = case.call(session=session, headers={**admin})
                sent.append(label)  # noqa: B023  (used within this iteration only)
                try:
                    case.validate_response(response, checks=CHECKS)
                except Exception as exc:  # collect every failure, report them together
                    failures.append(f"{label}: {str(exc).splitlines()[0]}")  # noqa: B023

            exercise()

    assert failures == []
    assert len(sent) >= MINIMUM_REQUESTS, f"only {len(sent)} requests were generated"
