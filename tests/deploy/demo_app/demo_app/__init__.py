"""Demo Flower app for the deployment harness (tests/deploy/cluster.py)."""
