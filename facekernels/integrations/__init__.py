"""Adapters for other libraries' machinery (imported on demand: facekernels itself needs
none of them)."""
