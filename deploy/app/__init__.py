"""The application: the Python API (`Trainer`), the CLI, `ray job submit` and `rlfleet scale`,
the run's control actor, the demos and their report, the supervised stages, input checks."""
