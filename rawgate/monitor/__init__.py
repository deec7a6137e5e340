"""Monitoring: the request log (SQLite, off the event loop, bounded) and what reads it. Depends
on the base modules only; the gateway records into it, the CLI and the admin API read it.
"""
