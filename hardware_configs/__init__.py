"""Instrument configs shipped with ctcscan (Micro-Manager .cfg + instrument YAML).

A Python package only so that the files install with ctcscan; see README.md here.
"""

from pathlib import Path

#: Folder holding the shipped configs.
CONFIG_DIR = Path(__file__).resolve().parent
