"""What a run leaves on disk as it goes: `metrics.jsonl` and progress lines, a checkpoint
after every round, and the run's report."""
