"""Qualification tools shipped on purpose: the stress matrix, the disturber
and the kill test behind ``python -m rseq stress``.  Users run them to qualify
a kernel and CPU; the test suite drives the same code."""
