"""Focus: the pure surface (`surface`), the map measured on hardware (`mapper`),
per-field QC and re-focus (`qc`)."""
