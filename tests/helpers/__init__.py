"""Helpers shared by the core tests (subprocess runners, seccomp, pinning)."""
