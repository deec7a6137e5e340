"""What several rawgate processes or machines share: cooldowns, the response store, client keys and
their limits, usage, OAuth tokens, the accounts list. One interface, two backends: local files
(one machine) and Redis/Valkey (a fleet). Depends on the base modules and accounts.
"""
