"""Runs algorithms: client cohorts, sampling, rounds, metrics."""
