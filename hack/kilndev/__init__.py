"""Development tooling for Kiln's local cluster (stdlib only; imported by hack/ scripts and tests).

Callers put the repository's hack/ directory on sys.path and ``import kilndev.<module>``.
"""
