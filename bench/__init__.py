"""Benchmarks, the fuzzer and the soak run: commands that print measured figures."""
