"""Pure rules about members' personal data: phone numbers, ID numbers, masking."""

from __future__ import annotations

import re

from jifen.errors import InvalidInput

_NOT_DIGITS = re.compile(r"[\s().-]")


def normalise_phone(phone: str) -> str:
    """A mainland mobile number as its 11 digits (``+86 138 0013 8000`` → ``13800138000``)."""
    found = normalise_phone_or_none(phone)
    if found is None:
        raise InvalidInput(
            field="phone",
            problem="give a mainland mobile number of 11 digits starting with 1, "
            "optionally with +86",
        )
    return found


def normalise_phone_or_none(phone: str) -> str | None:
    digits = _NOT_DIGITS.sub("", phone.strip())
    if digits.startswith("+86"):
        digits = digits[3:]
    elif digits.startswith("0086"):
        digits = digits[4:]
    elif len(digits) == 13 and digits.startswith("86"):
        digits = digits[2:]
    if len(digits) == 11 and digits.isdigit() and digits.startswith("1"):
        return digits
    return None
