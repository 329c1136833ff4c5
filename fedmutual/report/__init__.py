"""Metrics files, tables and plots."""
