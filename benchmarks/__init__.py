"""Benchmarks and the labelled scenario suite; scripts run from a checkout (see each module), not shipped."""
