"""Runs: a scan (composed from the layers below), on-line detection
scheduling, outputs, the queue and re-analysis."""
