"""Benchmarks: each script measures one figure beside its physical limit, in the same run."""
