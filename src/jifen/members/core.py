"""Pure rules about members' personal data: phone numbers, ID numbers, masking, states."""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import date
from typing import Any

from jifen.errors import InvalidInput

_NOT_DIGITS = re.compile(r"[\s().-]")
_PHONE = re.compile(r"1[3-9][0-9]{9}")
"""A mainland mobile number: 11 digits, 13 to 19 first (10, 11 and 12 begin service
numbers and no mobile one: 12345678901 reaches nobody)."""
_ID_NUMBER = re.compile(r"[0-9]{17}[0-9X]")
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"

STATES = ("active", "frozen", "banned", "closed")
TRANSITIONS: frozenset[tuple[str, str]] = frozenset(
    {
        ("active", "frozen"), ("frozen", "active"),
        ("active", "banned"), ("frozen", "banned"), ("banned", "active"),
        ("active", "closed"), ("frozen", "closed"), ("banned", "closed"),
    }
)  # fmt: skip
"""Which state a member may move to from which; ``closed`` is final."""
FAMILY_SIZE = 8
"""Members of a family group at most, its main account included."""


def normalise_phone(phone: str) -> str:
    """A mainland mobile number as its 11 digits (``+86 138 0013 8000`` → ``13800138000``),
    beginning with 13 to 19."""
    _ascii_digits_only("phone", phone)
    found = normalise_phone_or_none(phone)
    if found is None:
        raise InvalidInput(
            field="phone",
            problem="give a mainland mobile number of 11 digits starting with 13 to 19, "
            "optionally with +86",
            problem_zh="请填写以 13 至 19 开头的 11 位中国大陆手机号,可带 +86",
        )
    return found


def normalise_phone_or_none(phone: str) -> str | None:
    """The 11 digits, or None. Only ASCII digits count: ``str.isdigit`` would take fullwidth
    or Arabic-Indic ones, and the same number so written would hash differently (bound to a
    second account, missed by a search, unusable for SMS)."""
    digits = _NOT_DIGITS.sub("", phone.strip())
    if digits.startswith("+86"):
        digits = digits[3:]
    elif digits.startswith("0086"):
        digits = digits[4:]
    elif len(digits) == 13 and digits.startswith("86"):
        digits = digits[2:]
    return digits if _PHONE.fullmatch(digits) else None


def _ascii_digits_only(field: str, value: str) -> None:
    """Refuse a number written with digits other than 0-9 (fullwidth ``１``, Arabic-Indic
    ``١``...), saying so: the general form message would leave the sender puzzled."""
    if any(char.isdigit() and not "0" <= char <= "9" for char in value):
        raise InvalidInput(
            field=field,
            problem="write the digits as 0-9 (ASCII), not fullwidth or other scripts' digits",
            problem_zh="请使用半角数字 0-9 填写,不要使用全角或其他文字的数字",
        )


def id_check_digit(first17: str) -> str:
    """The check character of a resident ID number (GB 11643, ISO 7064 MOD 11-2)."""
    return _ID_CHECK[sum(int(d) * w for d, w in zip(first17, _ID_WEIGHTS, strict=True)) % 11]


def check_id_number(value: str, *, today: date | None = None) -> str:
    """An 18-character PRC resident ID number, upper-cased; refused with the reason when its
    form, birth date (a real date from 1900, and not after ``today`` when given) or check
    character is wrong."""
    _ascii_digits_only("id_number", value)
    number = value.strip().upper()

    def refuse(problem: str, problem_zh: str) -> InvalidInput:
        return InvalidInput(field="id_number", problem=problem, problem_zh=problem_zh)

    if not _ID_NUMBER.fullmatch(number):
        raise refuse(
            "give the 18 characters of a resident ID: 17 digits, then a digit or X",
            "请填写 18 位居民身份证号:前 17 位为数字,最后一位为数字或 X",
        )
    try:
        born = date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        raise refuse(
            "characters 7 to 14 are not a real birth date (YYYYMMDD)",
            "第 7 至 14 位不是有效的出生日期(YYYYMMDD)",
        ) from None
    if born.year < 1900:
        raise refuse(
            "characters 7 to 14 give a birth date before 1900",
            "第 7 至 14 位表示的出生日期早于 1900 年",
        )
    if today is not None and born > today:
        raise refuse(
            "characters 7 to 14 give a birth date after today",
            "第 7 至 14 位表示的出生日期晚于今天",
        )
    if id_check_digit(number[:17]) != number[17]:
        raise refuse(
            "the last character does not match the others: check for a typing error",
            "最后一位校验码与前 17 位不符:请检查是否输错",
        )
    return number


def check_birthday(birthday: date | None, *, today: date) -> None:
    """Refuse a birthday after ``today`` (the programme's): a typing error, as no member is
    born in the future."""
    if birthday is not None and birthday > today:
        raise InvalidInput(
            field="birthday",
            problem=f"a birthday cannot be after today ({today.isoformat()})",
            problem_zh=f"生日不能晚于今天({today.isoformat()})",
        )


def mask_phone(phone: str) -> str:
    """``13800138000`` → ``138****8000``: enough to recognise, not to dial."""
    return phone[:3] + "****" + phone[-4:] if len(phone) >= 8 else "****"


def mask_id_number(number: str) -> str:
    """``11010519491231002X`` → ``1101**********002X``."""
    return number[:4] + "*" * (len(number) - 8) + number[-4:] if len(number) > 8 else "****"


ERASED_VALUE = "(erased)"
"""What an erased member's personal value is replaced with where another domain kept it."""


class PersonalValues:
    """An erased member's identifying values (its name, reference, email, birthday, phone
    and ID numbers, as they were before the erasure), to take out of what other domains
    keep about it: a text or number equal to one of them goes, and one holding one of at
    least 4 characters ("李雷 VIP", "tel:13800138000"); shorter ones are not looked for
    inside other texts, which they would match by chance."""

    def __init__(self, values: Iterable[str]) -> None:
        self.personal = frozenset(value for value in values if value)
        self.within = tuple(value for value in self.personal if len(value) >= 4)

    def __bool__(self) -> bool:
        return bool(self.personal)

    def __call__(self, value: Any, *, numbers: bool = True) -> Any:
        """``value`` (JSON: texts, numbers, lists, objects) with each text (and, unless
        ``numbers`` is false, each number) that is or holds one of the values replaced by
        :data:`ERASED_VALUE`. Where the numbers are jifen's own (amounts, units), they are
        left alone: a member reference such as "1001" is held by many an amount."""
        if isinstance(value, dict):
            return {key: self(item, numbers=numbers) for key, item in value.items()}
        if isinstance(value, list):
            return [self(item, numbers=numbers) for item in value]
        if isinstance(value, str) or (
            numbers and isinstance(value, (int, float)) and not isinstance(value, bool)
        ):
            text = str(value)
            if text in self.personal or any(found in text for found in self.within):
                return ERASED_VALUE
        return value
