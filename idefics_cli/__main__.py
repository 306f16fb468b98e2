"""`python -m idefics_cli` and the `idefics` script: the command line (Ctrl-C as it starts: 130, no traceback)."""

import sys


def main() -> None:
    try:
        from .cli import entry
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    entry()


if __name__ == "__main__":
    main()
