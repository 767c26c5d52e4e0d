"""The pure core of points: postings, lots, FIFO allocation, invariants and the hash chain.

Plain Python only. Nothing in this package imports a database, a web framework, a clock
or anything else from jifen; callers pass time in and write the plans out.
"""

from jifen.ledger.chain import GENESIS, PostingFacts, chain_link, checkpoint_root, posting_digest
from jifen.ledger.model import (
    AccountState,
    Allocation,
    Kind,
    Line,
    Lot,
    NewLot,
    Party,
    Plan,
    SystemAccount,
)
from jifen.ledger.postings import (
    consume,
    fifo_order,
    plan_adjust,
    plan_earn,
    plan_expire,
    plan_follow_renewal,
    plan_forfeit,
    plan_freeze,
    plan_refund,
    plan_release,
    plan_renew,
    plan_reverse,
    plan_spend,
    plan_transfer,
    plan_unfreeze,
    restore,
    spendable,
)

__all__ = [
    "GENESIS",
    "AccountState",
    "Allocation",
    "Kind",
    "Line",
    "Lot",
    "NewLot",
    "Party",
    "Plan",
    "PostingFacts",
    "SystemAccount",
    "chain_link",
    "checkpoint_root",
    "consume",
    "fifo_order",
    "plan_adjust",
    "plan_earn",
    "plan_expire",
    "plan_follow_renewal",
    "plan_forfeit",
    "plan_freeze",
    "plan_refund",
    "plan_release",
    "plan_renew",
    "plan_reverse",
    "plan_spend",
    "plan_transfer",
    "plan_unfreeze",
    "posting_digest",
    "restore",
    "spendable",
]
