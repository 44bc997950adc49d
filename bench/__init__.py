"""pytest-benchmark suites (`pytest bench --benchmark-only`): a package so that the suites share bench/_timing.py."""
