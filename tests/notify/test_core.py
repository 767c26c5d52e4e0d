"""The pure core: retry schedule, signatures (with rotation and tolerance), address checks
and templates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jifen.errors import Refusal
from jifen.notify import core

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
T = int(NOW.timestamp())


# --------------------------------------------------------------------------- backoff


def test_the_schedule_starts_at_30_seconds_and_gives_up_after_the_last_attempt() -> None:
    assert core.retry_delay(1) == timedelta(seconds=30)
    assert core.retry_delay(2) == timedelta(minutes=2)
    assert core.retry_delay(3) == timedelta(minutes=10)
    assert core.retry_delay(4) == timedelta(hours=1)
    assert core.retry_delay(5) == timedelta(hours=6)
    assert core.retry_delay(core.MAX_ATTEMPTS - 1) is not None
    assert core.retry_delay(core.MAX_ATTEMPTS) is None


@given(st.integers(1, 50), st.integers(1, 50))
def test_delays_never_shrink_and_are_capped(first: int, second: int) -> None:
    a, b = sorted((first, second))
    cap = core.RETRY_DELAYS[-1]
    da = core.retry_delay(a, max_attempts=100)
    db = core.retry_delay(b, max_attempts=100)
    assert da is not None and db is not None
    assert da <= db <= cap


def test_retry_delay_is_asked_after_an_attempt() -> None:
    with pytest.raises(ValueError, match="at least one attempt"):
        core.retry_delay(0)


# --------------------------------------------------------------------------- signatures


def test_a_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    import hashlib
    import hmac

    header = core.sign(b'{"a":1}', ["whsec_x"], T)
    expected = hmac.new(b"whsec_x", f'{T}.{{"a":1}}'.encode(), hashlib.sha256).hexdigest()
    assert header == f"t={T},v1={expected}"


@given(body=st.binary(max_size=500), secret=st.text(min_size=1, max_size=40))
def test_what_is_signed_verifies_and_any_change_does_not(body: bytes, secret: str) -> None:
    header = core.sign(body, [secret], T)
    assert core.verify(header, body, [secret], NOW)
    assert not core.verify(header, body + b"x", [secret], NOW)
    assert not core.verify(header, body, [secret + "x"], NOW)


def test_during_rotation_both_secrets_sign_and_either_verifies() -> None:
    header = core.sign(b"body", ["new", "old"], T)
    assert header.count("v1=") == 2
    assert core.verify(header, b"body", ["old"], NOW)
    assert core.verify(header, b"body", ["new"], NOW)
    assert not core.verify(header, b"body", ["other"], NOW)


def test_a_signature_outside_the_tolerance_is_refused() -> None:
    header = core.sign(b"body", ["s"], T)
    assert core.verify(header, b"body", ["s"], NOW + timedelta(minutes=5))
    assert not core.verify(header, b"body", ["s"], NOW + timedelta(minutes=5, seconds=1))
    assert not core.verify(header, b"body", ["s"], NOW - timedelta(minutes=6))
    assert core.verify(header, b"body", ["s"], NOW + timedelta(hours=1), timedelta(hours=2))


@pytest.mark.parametrize(
    "header",
    [
        "",
        "t=1",
        "v1=ab",
        "t=x,v1=ab",
        "t=1,t=2,v1=ab",
        "garbage",
        f"t={T},v1=",
        # digits that are not 0-9: superscript, full-width, Arabic-Indic
        "t=²,v1=ab",
        f"t={T}²,v1=ab",
        "t=１７６７２２５６００,v1=ab",
        "t=١٧٦٧٢٢٥٦٠٠,v1=ab",
    ],
)
def test_malformed_headers_never_verify(header: str) -> None:
    assert not core.verify(header, b"body", ["s"], NOW)


# --------------------------------------------------------------------------- targets


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
     "0.0.0.0",  # noqa: S104  (an address to refuse, not one to bind)
     "::1", "fe80::1%eth0", "fc00::1", "::ffff:127.0.0.1", "224.0.0.1",
     "240.0.0.1", "192.0.2.1", "not an address",
     # 6to4 (2002::/16) carrying a loopback, link-local, private or unspecified IPv4
     "2002:7f00:1::1", "2002:a9fe:a9fe::1", "2002:a00:1::1", "2002::1"],
)  # fmt: skip
def test_private_loopback_link_local_and_reserved_addresses_are_refused(address: str) -> None:
    assert core.forbidden_address(address)


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2002:808:808::1"]
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert not core.forbidden_address(address)
    assert core.refused_addresses([address, "10.0.0.1"]) == ["10.0.0.1"]


def test_targets_are_http_or_https_without_credentials() -> None:
    target = core.parse_target("https://hooks.example.com/in?x=1")
    assert (target.scheme, target.host, target.port, target.path) == (
        "https", "hooks.example.com", 443, "/in?x=1",
    )  # fmt: skip
    assert core.parse_target("http://example.com").port == 80
    for bad in ["ftp://example.com/", "http://user:pw@example.com/", "http:///x",
                "http://example.com:99999/"]:  # fmt: skip
        with pytest.raises(ValueError):  # noqa: PT011  (the message varies by case)
            core.parse_target(bad)


# --------------------------------------------------------------------------- templates


def test_templates_are_rendered_in_chinese_by_default_and_in_english_on_request() -> None:
    data = {"points": 120, "expires_on": "2026-12-31", "schedule": "",
            "suggestions_zh": "", "suggestions_en": ""}  # fmt: skip
    zh = core.render("expiry.reminder", core.language_of(data), data)
    en = core.render("expiry.reminder", core.language_of({"language": "en"}), data)
    assert zh.subject == "您有 120 积分将于 2026-12-31 到期"
    assert "请在到期前使用" in zh.text
    assert en.subject == "120 of your points expire on 2026-12-31"
    assert "Use them before then." in en.text


@pytest.mark.parametrize("language", ["zh", "en"])
def test_a_template_given_too_little_data_is_refused_naming_what_is_missing(
    language: str,
) -> None:
    # tier.changed reads the tier before the change too: left out, the member would read
    # "${previous_tier}"
    with pytest.raises(Refusal) as refused:
        core.render("tier.changed", language, {"tier": "金卡"})
    assert str(refused.value) == (
        f"template {language}/tier.changed needs previous_tier, which its data does not give"
    )
    assert "previous_tier" in refused.value.zh
    both = core.render("tier.changed", language, {"tier": "金卡", "previous_tier": "银卡"})
    assert "${" not in both.subject + both.text and "银卡" in both.text


def test_an_unknown_template_keeps_its_data_and_a_bad_name_is_refused() -> None:
    rendered = core.render("custom.thing", "en", {"b": 2, "a": 1})
    assert rendered == core.Rendered(subject="custom.thing", text="a: 1\nb: 2")
    with pytest.raises(ValueError, match="template name"):
        core.render("../../etc/passwd", "en", {})


def test_emails_are_masked() -> None:
    assert core.mask_email("alice@example.com") == "a****@example.com"
    assert core.mask_email("nobody") == "****"
