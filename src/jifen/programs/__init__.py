"""Programmes: each scopes its own points currency, accounts, rules and time zone."""
