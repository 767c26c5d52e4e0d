"""The routers' order is free: no two routes answer the same method and path, so putting the
busiest first (``jifen.api.app.DOMAINS``) changes which route runs for no request."""

from __future__ import annotations

import re

from fastapi.routing import APIRoute
from starlette.routing import compile_path

from jifen.api.app import DOMAINS


def _example(path: str) -> str:
    """A concrete path the template answers: each parameter filled with ``1``."""
    return re.sub(r"\{[^}]+\}", "1", path)


def test_no_two_routes_answer_the_same_request() -> None:
    routes = [
        (module.__name__, route)
        for module in DOMAINS
        for route in module.router.routes
        if isinstance(route, APIRoute)
    ]
    assert len(routes) > 100, "every domain's routes are collected"
    clashes = [
        f"{owner} {sorted(route.methods)} {route.path} is also {other_owner} {other.path}"
        for owner, route in routes
        for other_owner, other in routes
        if other is not route
        and route.methods & other.methods
        and compile_path(other.path)[0].match(_example(route.path))
    ]
    assert clashes == []


def test_the_check_sees_a_clash() -> None:
    # a parameter where another route has a word: /members/search is /members/{member_id}
    regex, _, _ = compile_path("/programs/{program}/members/{member_id}")
    assert regex.match(_example("/programs/{program}/members/search"))
