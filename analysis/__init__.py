"""Image analysis of stored fields: pure numpy / scikit-image, no instrument code."""

from analysis.qc import channel_qc

__all__ = ["channel_qc"]
