"""`relay-harness accept`: read-only acceptance checks of an existing mail host (after an upgrade).

The work is in `run` (orchestration), `facts` (what is read from the host) and `baseline`
(before/after comparison); the command line is in `harness.cli`, the reports in `harness.report`.
"""

# How the relay probe runs; here, not in `run`, so the command line can offer them without
# importing the SSH stack (paramiko) for every command.
RELAY_MODES = ("auto", "sandbox", "lab")
