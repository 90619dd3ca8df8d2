"""The reliability suite: workloads under injected faults, checked against an oracle."""
