"""``python -m controller`` and the ``ctcscan`` command: the command line.

Only the standard library is imported here, so that Ctrl-C while the command
line's modules load (a second or more) ends as Ctrl-C does later: one line,
exit status 130, not a traceback.
"""

from __future__ import annotations

import sys


def main() -> None:
    """Console-script entry point."""
    try:
        from controller.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        raise SystemExit(130) from None
    cli_main()


if __name__ == "__main__":
    main()
