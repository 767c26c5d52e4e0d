"""The migrations build exactly the schema the code declares, on both backends."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from jifen.clock import ManualClock
from jifen.db.migrate import current_revision, head_revision, is_current, upgrade
from jifen.db.schema import metadata
from jifen.db.uow import Database
from jifen.errors import PaymentUsed
from jifen.rewards.models import reward_orders
from tests.conftest import START
from tests.rewards.shop import Shop


def test_migrated_schema_matches_the_models(db: Database) -> None:
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        differences = compare_metadata(context, metadata)
    assert differences == []


def test_0012_waits_for_orders_that_share_a_payment_to_be_put_right(tmp_path: Path) -> None:
    # given a database at 0011 where two orders name one payment (nothing refused it then)
    db = Database(f"sqlite:///{tmp_path / 'old.db'}", clock=ManualClock(START))
    upgrade(db.engine, "0011")
    shop = Shop.open(db)
    (member,) = shop.member(5000)
    kettle = shop.reward(points=100, cash_fen=900)
    first = shop.redeem(member, kettle.code, payment_ref="pay-1")
    second = shop.redeem(member, kettle.code, payment_ref="pay-2")
    share = reward_orders.update().where(reward_orders.c.id == second.id)
    db.run(lambda uow: uow.conn.execute(share.values(payment_ref="pay-1")))
    # when it is upgraded, it is refused, naming the payment, and nothing changes
    with pytest.raises(RuntimeError, match="'pay-1' × 2"):
        upgrade(db.engine)
    assert current_revision(db.engine) == "0011"
    # once the orders are put right, the upgrade goes through
    db.run(lambda uow: uow.conn.execute(share.values(payment_ref="pay-2b")))
    upgrade(db.engine)
    assert is_current(db.engine)
    with pytest.raises(PaymentUsed, match=f"order {first.id}"):
        shop.redeem(member, kettle.code, payment_ref="pay-1")
    db.dispose()


def test_database_is_at_head_and_upgrading_again_changes_nothing(db: Database) -> None:
    assert head_revision(db.engine) == "0012"
    assert is_current(db.engine)
    upgrade(db.engine)
    assert is_current(db.engine)
