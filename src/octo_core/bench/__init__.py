"""Benchmarks shipped with octo_core (``octo bench``): payload IDL, builders, runners."""
