"""What the members use cases take and answer with."""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic.json_schema import SkipJsonSchema

from jifen.api.schemas import NO_NUL, RequestBody
from jifen.auth.schemas import MemberSignInData
from jifen.errors import Refusal
from jifen.notify.schemas import MessageToMember
from jifen.points.schemas import BalanceSummary


class MemberRead(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    program_id: int
    external_ref: str
    state: str = "active"
    created_at: datetime


# --------------------------------------------------------------------------- requests

State = Literal["active", "frozen", "banned", "closed"]
Gender = Literal["female", "male", "other", "undisclosed"]
Language = Literal["zh", "en"]
"""The language of the messages jifen sends a member (none chosen: Chinese)."""
Tag = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[\w.-]+$")]
"""Letters (any script), digits, ``_``, ``.`` and ``-``."""


def _once(tags: list[str]) -> list[str]:
    """Each tag once, in the order first given: a member is vip or not, and ["vip", "vip"]
    stored as it came would show twice and count twice."""
    return list(dict.fromkeys(tags))


Tags = Annotated[list[Tag], Field(max_length=20), AfterValidator(_once)]
"""A member's tags, each kept once."""
_EMAIL_PART = r'[^@\s\x00-\x1f\x7f,;<>()\[\]\\:"]+'
"""A part of an address, without the characters that separate or quote addresses in an
email's To field: "li,boss@example.com" would be sent to li and to boss@example.com."""
_EMAIL = rf"^{_EMAIL_PART}@{_EMAIL_PART}\.{_EMAIL_PART}$"


def _an_email(value: str) -> str:
    """Refuse what is no email address, saying how one is written (the pattern alone tells
    a member nothing)."""
    if not re.fullmatch(_EMAIL, value):
        raise Refusal(
            "is not an email address: write one as name@example.com, with no spaces and "
            'none of , ; < > ( ) [ ] \\ : "',
            "不是有效的电子邮箱地址:请写一个 name@example.com 形式的地址,不含空格,也不含 "
            ', ; < > ( ) [ ] \\ : "',
        )
    return value


Email = Annotated[
    str,
    Field(max_length=254, json_schema_extra={"pattern": _EMAIL}),
    AfterValidator(_an_email),
]


Name = Annotated[str, Field(max_length=100, pattern=NO_NUL)]
Region = Annotated[str, Field(max_length=100, pattern=NO_NUL)]


def _printable(value: str | None) -> str | None:
    """Refuse a control character (a terminal escape, a bell, a line break, DEL) in a text
    that every screen, receipt and export of the member shows."""
    for char in value or "":
        if char < " " or char == "\x7f":
            raise Refusal(
                f"holds a control character (U+{ord(char):04X}); remove it",
                f"含有控制字符(U+{ord(char):04X}),请删除",
            )
    return value


_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _written_as_a_date(value: object) -> object:
    """A birthday is given as ``YYYY-MM-DD``: a number ("0", "00000000", "19900102") would be
    read as seconds since 1970, and an unknown birthday written as 0 become 1 January 1970."""
    if isinstance(value, date) or (isinstance(value, str) and _ISO_DATE.fullmatch(value)):
        return value
    raise Refusal(
        "give the birthday as a date, YYYY-MM-DD (for example 1990-01-02)",
        "请按 YYYY-MM-DD 格式填写生日(例如 1990-01-02)",
    )


def _plausible_birthday(value: date) -> date:
    if not date(1900, 1, 1) <= value <= date(2100, 1, 1):
        raise Refusal("give a birthday from 1900 on", "请给出 1900 年及以后的生日")
    return value


Birthday = Annotated[date, BeforeValidator(_written_as_a_date), AfterValidator(_plausible_birthday)]
Phone = Annotated[str, Field(min_length=1, max_length=32, pattern=NO_NUL)]


class MemberCreate(RequestBody):
    """A new member; ``external_ref`` is its id in the merchant's own systems."""

    external_ref: Annotated[str, Field(min_length=1, max_length=128, pattern=NO_NUL)]
    name: Name = ""
    email: Email | None = None
    birthday: Birthday | None = None
    gender: Gender | None = None
    region: Region | None = None
    tags: Tags = []  # noqa: RUF012 (pydantic copies it)
    phone: Phone | None = None
    """A mainland mobile number: stored as a keyed hash and encrypted, shown masked."""
    language: Language | None = None
    """The language of the messages jifen sends the member (none: Chinese)."""

    _texts_printable = field_validator("external_ref", "name", "region")(_printable)


class MemberUpdate(RequestBody):
    """The profile fields a member or staff may change; what is left out stays as it is.
    State, phone, ID number, tier and balance have routes of their own."""

    name: Name | SkipJsonSchema[None] = None
    email: Email | None = None
    birthday: Birthday | None = None
    gender: Gender | None = None
    region: Region | None = None
    tags: Tags | SkipJsonSchema[None] = None
    language: Language | None = None
    """The language of its messages; null: jifen's default, Chinese."""

    _texts_printable = field_validator("name", "region")(_printable)

    @field_validator("name", "tags", mode="before")
    @classmethod
    def _kept_when_null(cls, value: object) -> object:
        """A member always has a name and a list of tags: null cannot clear them."""
        if value is None:
            raise Refusal(
                'cannot be null: leave it out to keep it, or give "" or [] to clear it',
                '不能为 null:不给出该字段即保持原值,给出 "" 或 [] 即清空',
            )
        return value


class StateChange(RequestBody):
    state: State
    reason: Annotated[str, Field(min_length=1, max_length=500, pattern=NO_NUL)]


class IdentityBind(RequestBody):
    """Real-name binding: a resident ID number and a mobile number."""

    id_number: Annotated[str, Field(min_length=1, max_length=32, pattern=NO_NUL)]
    phone: Phone


# --------------------------------------------------------------------------- answers


class _Read(BaseModel):
    model_config = ConfigDict(frozen=True)


class MemberProfile(_Read):
    id: int
    program_id: int
    external_ref: str
    name: str
    email: str | None
    birthday: date | None
    gender: str | None
    region: str | None
    tags: list[str]
    state: str
    phone: str | None
    """Masked (``138****8000``); the full number needs ``members.pii``."""
    id_number: str | None
    """Masked; the full number needs ``members.pii``."""
    verified_at: datetime | None
    """When the real-name binding was made."""
    family_main_id: int | None
    created_at: datetime
    updated_at: datetime | None
    language: str | None = None
    """The language of the messages jifen sends the member; none: Chinese."""


class MemberPage(_Read):
    items: list[MemberProfile]
    next_cursor: str | None


class IdentityRead(_Read):
    """The bound identity in full, for staff holding ``members.pii``; every read is audited."""

    member_id: int
    phone: str | None
    id_number: str | None
    verified_at: datetime | None


class FamilyMember(_Read):
    member_id: int
    external_ref: str
    name: str
    main: bool
    points: BalanceSummary | None
    """Shown to the main account and to staff, not to the other members."""


class FamilyRead(_Read):
    main_member_id: int | None
    """None when the member is in no family group."""
    members: list[FamilyMember]


class MemberFacts(_Read):
    """What earning rules read about a member."""

    id: int
    state: str
    """active, frozen, banned or closed: only an active member earns."""
    tags: list[str]
    region: str | None
    birthday: date | None
    created_at: datetime


# --------------------------------------------------------------------------- personal data


class PersonalIdentity(_Read):
    """The bound numbers in full (decrypted)."""

    phone: str | None
    id_number: str | None
    verified_at: datetime | None


class PersonalFamily(_Read):
    """The member's family link: the group's main account and the ids of its members
    (other members' names are theirs, not part of this member's data)."""

    main_member_id: int | None
    member_ids: list[int]


class MemberPersonalData(_Read):
    """What the members domain holds about one member (see :class:`PersonalData`)."""

    member_id: int
    erased: bool
    profile: MemberProfile
    """As every answer shows it (numbers masked); ``identity`` has them in full."""
    identity: PersonalIdentity
    family: PersonalFamily


class Erasure(_Read):
    """The answer to an erasure: the same to every later erasure of the member."""

    member_id: int
    state: str
    erased: bool
    erased_at: datetime | None
    """When the personal fields were last cleared (the profile's ``updated_at``)."""


class PersonalPoints(_Read):
    summary: BalanceSummary
    history: str
    """Where the postings are read, a page at a time (``points.read``; the member itself)."""


class PersonalData(_Read):
    """Everything jifen holds about a member, for the member or for staff holding
    ``members.pii``. jifen keeps no consents or preferences of a member (a text's language
    comes from the request that causes it), so there are none to list."""

    member_id: int
    program: str
    erased: bool
    """The personal fields were erased (the account is closed): what is left below is the
    member's id, its state, its family link if any, and its points."""
    profile: MemberProfile
    """As every answer shows it (numbers masked); ``identity`` has them in full."""
    identity: PersonalIdentity
    family: PersonalFamily
    sign_in: MemberSignInData
    stored_answers: int
    """How many answers to writes about the member jifen keeps for ``Idempotency-Key``
    replays: each holds what its write answered (the profile as it was then, say), which
    ``profile`` and the rest show as it is now. Erasure erases them (0 after it)."""
    notifications: list[MessageToMember]
    """Every message to the member, oldest first (in-app, email, SMS; the text telling a
    phone number that it was replaced by another counts too)."""
    points: PersonalPoints
