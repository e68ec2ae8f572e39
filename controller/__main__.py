"""``python -m controller`` runs the ctcscan command line."""

from controller.cli import main

main()
