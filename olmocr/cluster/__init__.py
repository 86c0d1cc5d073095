"""Helpers for running the deployment and the pipeline under a cluster scheduler (Slurm): ``ports`` chooses a
task's ports, ``ready`` waits for its supervised servers (docs/slurm.md)."""
