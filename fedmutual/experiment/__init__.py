"""Experiments: what a run is made of and how it is carried out."""
