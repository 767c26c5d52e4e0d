"""Random sequences of redemptions, cancellations, shipping, returns, vouchers used or left to
expire, cooling-off holds, points + cash paid at the till, later or never, and the clock
moving, against a simple model of where every point and every unit is.

After every step: no stock below zero and each reward's stock plus what is sold equals what
was stocked; what is sold equals the units of live orders; each member's points are its
funding less what its live orders cost (less what expired vouchers gave back); the ledger
reconciles and verifies. A refusal changes nothing.
"""

from __future__ import annotations

from contextlib import suppress
from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from jifen.clock import ManualClock
from jifen.db.uow import Database
from jifen.errors import Refused
from jifen.points import service as points
from jifen.rewards import service as rewards
from jifen.rewards.schemas import OrderRead
from tests.factories import assert_ledger_sound
from tests.rewards.shop import Shop

FUNDS = 30_000
KINDS: list[dict[str, Any]] = [
    {"code": "mug", "points": 700, "stock": 6},  # goods, limited
    {"code": "wash", "kind": "service", "points": 900},  # a voucher, unlimited
    {"code": "watch", "points": 9000, "stock": 3},  # held above 5,000 for 钻石
    {"code": "towel", "points": 300, "stock": 4, "pickup": True, "max_quantity": 2},
    {"code": "kettle", "points": 500, "cash_fen": 900, "stock": 4},  # points + cash
]


def make_machine(db: Database) -> type[RuleBasedStateMachine]:
    class RedemptionMachine(RuleBasedStateMachine):
        @initialize()
        def open_shop(self) -> None:
            assert isinstance(db.clock, ManualClock)
            self.clock = db.clock
            self.shop = Shop.open(db)
            self.members = self.shop.member(FUNDS, tier="钻石", count=2) + self.shop.member(
                FUNDS, tier="金卡", count=1
            )
            self.rewards = {k["code"]: self.shop.reward(**{**k, "code": k["code"]}) for k in KINDS}
            self.stocked = {code: r.stock_total for code, r in self.rewards.items()}
            self.orders: dict[int, OrderRead] = {}
            self.payments = 0

        def refresh(self, order_id: int) -> OrderRead:
            order = db.run(lambda uow: rewards.get_order(uow, program_id=self.shop.program_id,
                                                         order_id=order_id))  # fmt: skip
            self.orders[order_id] = order
            return order

        def pick(self, data: st.DataObject, *states: str) -> OrderRead | None:
            live = sorted(o for o, v in self.orders.items() if v.state in states)
            return self.orders[data.draw(st.sampled_from(live))] if live else None

        def payment_ref(self) -> str:
            self.payments += 1
            return f"pay-{self.payments}"

        @rule(member=st.integers(0, 2), reward=st.sampled_from([k["code"] for k in KINDS]),
              quantity=st.integers(1, 2), at_till=st.booleans())  # fmt: skip
        def redeem(self, member: int, reward: str, quantity: int, at_till: bool) -> None:
            # A cash part paid at the till names its payment; else the order awaits it.
            paid = {"payment_ref": self.payment_ref()} if at_till and reward == "kettle" else {}
            try:
                order = self.shop.redeem(self.members[member], self.rewards[reward].code,
                                         quantity=quantity, **paid)  # fmt: skip
            except Refused:
                return
            self.orders[order.id] = order

        @rule(data=st.data())
        def pay(self, data: st.DataObject) -> None:
            order = self.pick(data, "awaiting_payment")
            if order is None:
                return
            with suppress(Refused):
                db.run(lambda uow: rewards.pay_order(
                    uow, program_id=self.shop.program_id, order_id=order.id,
                    payment_ref=self.payment_ref(), amount_fen=order.cash_fen, actor="key:pay",
                ))  # fmt: skip
            self.refresh(order.id)

        @rule(data=st.data(), action=st.sampled_from(["cancel", "ship", "deliver", "return"]))
        def move(self, data: st.DataObject, action: str) -> None:
            order = self.pick(data, "awaiting_payment", "held", "created", "shipped", "delivered")
            if order is None:
                return
            with suppress(Refused):
                self.shop.move(order.id, action)
            self.refresh(order.id)

        @rule(data=st.data())
        def confirm(self, data: st.DataObject) -> None:
            order = self.pick(data, "held")
            if order is None:
                return
            with suppress(Refused):
                db.run(lambda uow: rewards.confirm_held(
                    uow, program_id=self.shop.program_id, member_id=order.member_id,
                    order_id=order.id, actor="member"))  # fmt: skip
            self.refresh(order.id)

        @rule(data=st.data())
        def use_voucher(self, data: st.DataObject) -> None:
            order = self.pick(data, "created", "delivered")
            if order is None or order.voucher is None:
                return
            code = order.voucher.code
            with suppress(Refused):
                db.run(
                    lambda uow: rewards.use_voucher(
                        uow, program_id=self.shop.program_id, code=code, store="S1", actor="c"
                    )
                )
            self.refresh(order.id)

        # Days for vouchers and holds; minutes around the 30 an order has to be paid in.
        @rule(days=st.integers(0, 40), minutes=st.sampled_from([1, 20, 40]))
        def time_passes(self, days: int, minutes: int) -> None:
            self.clock.advance(timedelta(days=days, minutes=minutes))
            db.run(lambda uow: rewards.expire_vouchers(uow, program_id=self.shop.program_id))
            db.run(lambda uow: rewards.expire_holds(uow, program_id=self.shop.program_id))
            db.run(lambda uow: rewards.lapse_payments(uow, program_id=self.shop.program_id))
            for order_id in list(self.orders):
                self.refresh(order_id)

        @staticmethod
        def cost(order: OrderRead) -> int:
            """What an order has cost its member in the end: nothing while it awaits its
            payment or is held (the points are frozen, still the member's) or once given
            back; the fee of a voucher that expired unused; else its price."""
            if order.voucher is not None and order.voucher.state == "expired":
                return order.points * 10 // 100
            if order.state in ("awaiting_payment", "held", "cancelled", "returned"):
                return 0
            return order.points

        @invariant()
        def stock_points_and_ledger_agree(self) -> None:
            if not hasattr(self, "shop"):
                return
            for code, reward in self.rewards.items():
                now = self.shop.get(reward.code)
                gone = ("cancelled", "returned")
                live = sum(o.quantity for o in self.orders.values()
                           if o.reward == reward.code and o.state not in gone)  # fmt: skip
                if self.stocked[code] is not None:
                    assert now.stock_left is not None and now.stock_left >= 0
                    assert now.stock_left + now.sold == self.stocked[code]
                    assert now.sold == live
            for member in self.members:
                cost = sum(self.cost(o) for o in self.orders.values() if o.member_id == member)
                summary = db.run(lambda uow, m=member: points.balance(uow, member_id=m))
                assert summary.balance + summary.frozen == FUNDS - cost, member
            assert_ledger_sound(db, self.shop.program_id)

    return RedemptionMachine


def test_random_redemptions_keep_stock_points_and_the_ledger_exact(db: Database) -> None:
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(
        make_machine(db),
        settings=settings(
            max_examples=10,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
