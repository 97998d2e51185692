"""Scaling-law studies of patch-level training: plan, run, collect, fit, report, recommend.

A study stays its own room: it plans cells, launches ``megapatch train`` for each and reads the
run records; it never reaches into the training loop.
"""
