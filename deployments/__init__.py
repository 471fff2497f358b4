"""Prefect deployments of Baton's flows."""
