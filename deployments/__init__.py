"""Prefect deployments of the federated training flow: ``prefect.yaml`` for work pools and
workers, ``serve`` for one process that both schedules and runs them."""
