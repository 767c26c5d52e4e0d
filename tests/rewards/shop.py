"""A programme with the documents' redemption terms, members with points, and rewards."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select

from jifen.db.uow import Database, UnitOfWork
from jifen.members import service as members
from jifen.points import service as points
from jifen.points.models import postings
from jifen.programs import service as programs
from jifen.rewards import service as rewards
from jifen.rewards.models import reward_orders
from jifen.rewards.schemas import (
    OrderRead,
    RedemptionCreate,
    RewardCreate,
    RewardRead,
    VoucherUsed,
)
from jifen.tiers import service as tiers
from jifen.tiers.schemas import TierDef
from tests.factories import new_program

TIERS = [
    TierDef(code="普通", name="普通", rank=0),
    TierDef(code="银卡", name="银卡", rank=1),
    TierDef(code="金卡", name="金卡", rank=2),
    TierDef(code="钻石", name="钻石", rank=3),
]

POLICY: dict[str, Any] = {
    "default": {"max_points": 2000, "per_month": 3},
    "tiers": {
        "普通": {"max_points": 2000, "per_month": 3},
        "银卡": {"discount_pct": 90, "max_points": 5000, "per_month": 5},
        "金卡": {"discount_pct": 80, "max_points": 10000},
        "钻石": {"discount_pct": 70, "cooling_off_above": 5000, "cooling_off_hours": 24},
    },
    "birthday_pct": 120,
    "category_pct": {"数码": 80},
    "dynamic": {"threshold_pct": 80, "rise_pct": 20},
    "voucher_fee_pct": 10,
}


@dataclass
class Shop:
    db: Database
    program_id: int
    code: str
    """The programme's code, as in URLs."""

    @classmethod
    def open(cls, db: Database, **policy: Any) -> Shop:
        program = new_program(db)

        def setup(uow: UnitOfWork) -> None:
            tiers.set_tiers(uow, program_id=program.id, definitions=TIERS)
            settings = programs.get_settings(uow, program_id=program.id)
            merged = {**POLICY, **policy}
            programs.set_settings(
                uow,
                program_id=program.id,
                settings=settings.model_copy(
                    update={"redemption": type(settings.redemption).model_validate(merged)}
                ),
            )

        db.run(setup)
        return cls(db, program.id, program.code)

    def member(self, points_: int = 0, tier: str | None = None, count: int = 1) -> list[int]:
        ids = self.db.run(
            lambda uow: [
                members.register_member(
                    uow, program_id=self.program_id, external_ref=uuid.uuid4().hex
                ).id
                for _ in range(count)
            ]
        )

        def fund(uow: UnitOfWork) -> None:
            for member_id in ids:
                if tier is not None:
                    tiers.set_member_tier(uow, program_id=self.program_id, member_id=member_id,
                                          tier=tier, reason="test", set_by="test")  # fmt: skip
                if points_:
                    points.earn(uow, member_id=member_id, amount=points_,
                                key=f"fund-{member_id}",
                                expires_at=uow.clock.now() + timedelta(days=400))  # fmt: skip

        self.db.run(fund)
        return ids

    def reward(self, **fields: Any) -> RewardRead:
        body: dict[str, Any] = {"code": f"r{uuid.uuid4().hex[:8]}", "kind": "physical",
                                "name": {"zh": "礼品", "en": "Gift"}, "points": 1000}  # fmt: skip
        body.update(fields)
        create = RewardCreate.model_validate(body)
        return self.db.run(
            lambda uow: rewards.create_reward(uow, program_id=self.program_id, body=create)
        )

    def redeem(self, member_id: int, reward: str, key: str | None = None,
               **fields: Any) -> OrderRead:  # fmt: skip
        body = RedemptionCreate.model_validate({"reward": reward, **fields})
        return self.db.run(
            lambda uow: rewards.redeem(
                uow, program_id=self.program_id, member_id=member_id, body=body,
                key=key or uuid.uuid4().hex, actor=f"member:{member_id}",
            )
        )  # fmt: skip

    def move(self, order_id: int, action: str, **fields: Any) -> OrderRead:
        return self.db.run(
            lambda uow: rewards.move(
                uow,
                program_id=self.program_id,
                order_id=order_id,
                action=action,
                actor="staff:test",
                **fields,
            )
        )

    def use(self, code: str, amount_fen: int | None = None, store: str = "S1") -> VoucherUsed:
        """A till at ``store`` accepts the voucher (a coupon on an order of ``amount_fen``)."""
        return self.db.run(
            lambda uow: rewards.use_voucher(
                uow, program_id=self.program_id, code=code, store=store, actor="cashier",
                order_amount_fen=amount_fen,
            )
        )  # fmt: skip

    def available(self, member_id: int) -> int:
        return self.db.run(
            lambda uow: points.balance(uow, member_id=member_id), read_only=True
        ).available

    def get(self, code: str) -> RewardRead:
        return self.db.run(
            lambda uow: rewards.get_reward(uow, program_id=self.program_id, code=code),
            read_only=True,
        )

    def counts(self) -> tuple[int, int]:
        """Orders and postings of the programme: what a refused request must not change."""

        def read(uow: UnitOfWork) -> tuple[int, int]:
            orders = uow.conn.execute(
                select(func.count()).where(reward_orders.c.program_id == self.program_id)
            ).scalar_one()
            posted = uow.conn.execute(
                select(func.count()).where(postings.c.program_id == self.program_id)
            ).scalar_one()
            return int(orders), int(posted)

        return self.db.run(read, read_only=True)
