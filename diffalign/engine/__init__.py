"""The engine every training program runs on: one `Run` (setup, resume, signals, trackers, guards, checkpoints)
and the shared optimizer step."""
