"""Acquisition: the plan (useq), the engine at pymmcore-plus hooks, frame checks,
field assembly."""
