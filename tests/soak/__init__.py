"""Soak: the proxy as a process under minutes of mixed traffic with short-lived tokens.

`python -m tests.soak [--seconds 300]` runs it and exits non-zero on any failed criterion;
`test_soak_short.py` runs the same driver for about 25 seconds inside `make test`.
"""
