"""The README's API tour, run as written with curl against ``jifen serve`` on the demo."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from jifen.demo import credentials

README = Path(__file__).parent.parent / "README.md"


def tour() -> str:
    """The shell block that follows ``<!-- tour -->`` in the README."""
    text = README.read_text()
    found = re.search(r"<!-- tour -->\s*```sh\n(.*?)```", text, re.DOTALL)
    assert found, "the README has a tour block"
    return found.group(1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A small demo served by ``jifen serve``: its address and the merchant key."""
    env = {**os.environ, "JIFEN_DATA_DIR": str(tmp_path / "data")}
    url = f"sqlite:///{tmp_path / 'tour.db'}"
    jifen = [sys.executable, "-m", "jifen", "--database-url", url]
    built = subprocess.run(
        [*jifen, "demo", "--members", "5", "--days", "7", "--no-serve"], env=env,
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    kept = credentials.load(tmp_path / "data", "demo")
    assert kept is not None
    token = next(item.token for item in kept if item.who == "api_key")
    port = free_port()
    server = subprocess.Popen(
        [*jifen, "serve", "--port", str(port), "--log-level", "warning"], env=env
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=2) as answer:  # noqa: S310
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert server.poll() is None, "jifen serve exited"
            assert time.monotonic() < deadline, "jifen serve did not become ready"
            time.sleep(0.2)
        yield base, token
    finally:
        server.kill()
        server.wait(timeout=30)


def test_the_readme_tour_runs_as_written_and_twice_does_nothing_twice(
    served: tuple[str, str],
) -> None:
    base, token = served
    env = {**os.environ, "JIFEN": base, "TOKEN": token}

    def run() -> list[dict[str, object]]:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", tour() + '\necho "MEMBER=$MEMBER"'],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        text, _, member = done.stdout.rpartition("MEMBER=")
        # curl prints each answer without a newline: read them one after another
        answers: list[dict[str, object]] = []
        decoder, at = json.JSONDecoder(), 0
        while (at := text.find("{", at)) != -1:
            answer, at = decoder.raw_decode(text, at)
            answers.append(answer)
        return [*answers, {"member": member.strip()}]

    first = run()
    earned, spent, event, quote, order, balance, history, _ = first
    assert earned["amount"] == 300 and earned["kind"] == "earn"
    assert spent["amount"] == 120 and spent["kind"] == "spend"
    # the order through the demo's rules: 3 points a yuan of 家电, +50 for the pickup,
    # pending for the return window (within the day cap of 1000 that a member without a
    # tier has, as one of the entry tier 普通)
    awards = {a["rule"]: a["points"] for a in event["awards"]}  # type: ignore[attr-defined]
    assert awards["spend"] == 897 and awards["pickup"] == 50, event
    # the tissues for 100 points (no tier, no birthday: the base price), collected with a
    # voucher at a store
    assert quote["points"] == 100 and order["points"] == 100
    assert order["state"] == "created" and order["voucher"]["state"] == "issued"  # type: ignore[index]
    assert (balance["available"], balance["pending"]) == (80, 947)
    kinds = [entry["kind"] for entry in history["items"]]  # type: ignore[index]
    # newest first: the redemption, the order's awards (one posting), the spend, the earning
    assert kinds == ["spend", "earn", "spend", "earn"]
    # the same tour again: every write replays its first answer, saying so
    again = run()
    for answer in (again[0], again[1], again[4]):  # the earning, the spend, the redemption
        assert answer["replayed"] is True  # type: ignore[index]
    assert [_as_first(a) for a in again] == [_as_first(a) for a in first]


def _as_first(answer: object) -> object:
    """An answer without its ``replayed`` flag (a replay sets it)."""
    if isinstance(answer, dict):
        return {k: v for k, v in answer.items() if k != "replayed"}
    return answer
