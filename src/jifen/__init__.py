"""jifen (积分): a membership loyalty points platform with an exact, tamper-evident ledger."""

__version__ = "0.1.0"
