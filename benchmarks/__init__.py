"""hvsim's benchmark suite (issue #6): ratio benchmarks, each figure beside a baseline measured in the same run.

Run `python -m benchmarks` from the repository root (`--quick` for tiny sizes,
`--json PATH` for the machine-readable result, `--profile` for cProfile of the hot
paths); see benchmarks/README.md.  Nothing here is part of the test suite's timing:
tests/test_benchmarks_smoke.py only checks that `--quick` runs.
"""
