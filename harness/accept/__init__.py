"""`relay-harness accept`: read-only acceptance checks of an existing mail host (after an upgrade).

The work is in `run` (orchestration), `facts` (what is read from the host) and `baseline`
(before/after comparison); the command line is in `harness.cli`, the reports in `harness.report`.
"""
