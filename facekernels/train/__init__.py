"""The reference trainer: `python -m facekernels.train` (console script facekernels-train)."""
