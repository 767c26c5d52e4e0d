"""The pure rules of members' personal data."""

from __future__ import annotations

from datetime import date

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jifen.errors import InvalidInput
from jifen.members import core

VALID_ID = "11010519491231002X"  # the standard's own example


def test_a_valid_resident_id_passes_in_either_case() -> None:
    assert core.check_id_number(VALID_ID) == VALID_ID
    assert core.check_id_number(VALID_ID.lower()) == VALID_ID


@pytest.mark.parametrize(
    ("number", "reason"),
    [
        ("11010519491231002", "18 characters"),
        ("1101051949123100X2", "18 characters"),
        ("110105194913310029", "birth date"),
        ("110105180001010029", "before 1900"),
        ("110105194912310021", "last character"),
    ],
)
def test_a_wrong_resident_id_is_refused_with_the_reason(number: str, reason: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        core.check_id_number(number)
    assert reason in refused.value.message("en")


body17 = st.builds(
    lambda region, day, seq: f"{region:06d}{day}{seq:03d}",
    st.integers(110000, 659999),
    st.dates(min_value=date(1900, 1, 1), max_value=date(2030, 12, 31)).map(
        lambda d: d.strftime("%Y%m%d")
    ),
    st.integers(0, 999),
)


@given(body17)
def test_any_number_with_its_computed_check_character_is_valid(first17: str) -> None:
    number = first17 + core.id_check_digit(first17)
    assert core.check_id_number(number) == number


@given(body17, st.integers(14, 16), st.integers(1, 9))
def test_changing_one_digit_of_the_sequence_is_caught(first17: str, at: int, by: int) -> None:
    number = first17 + core.id_check_digit(first17)
    changed = number[:at] + str((int(number[at]) + by) % 10) + number[at + 1 :]
    with pytest.raises(InvalidInput):
        core.check_id_number(changed)


@pytest.mark.parametrize(
    "written", ["13800138000", "+86 138 0013 8000", "0086-138-0013-8000", "8613800138000"]
)
def test_phone_numbers_are_normalised(written: str) -> None:
    assert core.normalise_phone(written) == "13800138000"


@pytest.mark.parametrize(
    "written",
    ["", "1380013800", "23800138000", "138001380001", "1380013800a", "12345678901",
     "+86 100 8610 0860", "11012345678"],
)  # fmt: skip
def test_a_phone_number_that_is_not_a_mobile_is_refused(written: str) -> None:
    assert core.normalise_phone_or_none(written) is None
    with pytest.raises(InvalidInput):
        core.normalise_phone(written)


FULLWIDTH = str.maketrans("0123456789", "０１２３４５６７８９")
ARABIC_INDIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")


@pytest.mark.parametrize("digits", [FULLWIDTH, ARABIC_INDIC])
def test_a_number_written_with_other_digits_than_ascii_is_refused(digits: dict[int, int]) -> None:
    """Such a number would hash differently from the same number in 0-9: a second account
    for one phone or one person."""
    phone = "1" + "3800138000".translate(digits)
    assert core.normalise_phone_or_none(phone) is None
    with pytest.raises(InvalidInput) as refused:
        core.normalise_phone(phone)
    english, chinese = refused.value.message("en"), refused.value.message("zh")
    assert english.startswith("phone: ") and "0-9" in english and "半角数字" in chinese
    with pytest.raises(InvalidInput) as refused:
        core.check_id_number(VALID_ID[:17].translate(digits) + "X")
    english = refused.value.message("en")
    assert english.startswith("id_number: ") and "0-9" in english


def test_masks_keep_only_the_ends() -> None:
    assert core.mask_phone("13800138000") == "138****8000"
    assert core.mask_id_number(VALID_ID) == "1101**********002X"


def test_closed_is_final_and_every_other_state_can_be_left() -> None:
    assert not [move for move in core.TRANSITIONS if move[0] == "closed"]
    for state in ("active", "frozen", "banned"):
        assert any(move[0] == state for move in core.TRANSITIONS)


def test_personal_values_go_from_texts_and_numbers_and_only_texts_when_asked() -> None:
    scrub = core.PersonalValues(["1001", "李雷", "13800138000", ""])
    kept = {"note": "李雷 called from tel:13800138000", "ref": "1001", "short": "李雷",
            "units": 100100, "phone": 13800138000, "tags": ["VIP 李雷", "ok"],
            "yes": True}  # fmt: skip
    assert scrub(kept) == {
        "note": "(erased)", "ref": "(erased)", "short": "(erased)", "units": "(erased)",
        "phone": "(erased)", "tags": ["VIP 李雷", "ok"], "yes": True,
    }  # fmt: skip
    # a short value is only found whole; numbers are left alone where they are jifen's own
    assert scrub(kept, numbers=False)["units"] == 100100
    assert scrub(kept, numbers=False)["phone"] == 13800138000
    assert scrub(kept, numbers=False)["note"] == "(erased)"
    assert not core.PersonalValues(["", ""])
