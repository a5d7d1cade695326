"""Correctness tests of shine's rules against the naive references in tests/reference.py."""
