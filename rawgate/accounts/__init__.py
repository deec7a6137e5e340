"""The account pool: the account store (accounts.json), the scheduler (picking, cooldowns,
breakers, retry budget), cooldowns shared between workers, OAuth tokens. Depends on the base
modules only.
"""
