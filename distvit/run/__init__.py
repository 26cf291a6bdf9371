"""What a run leaves on disk: the run folder, checkpoint files, metrics and W&B tracking, plots."""
