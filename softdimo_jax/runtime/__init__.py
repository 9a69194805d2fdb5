"""Infrastructure that knows nothing of the method: mesh, trainer, checkpoints, artifacts, converted checkpoints, process start-up."""
