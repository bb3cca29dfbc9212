"""The ``lightning-meta`` command and ``python -m lightning_meta``.

``--version`` is answered here, before torch and Lightning are imported (they take seconds); every
other command runs :func:`lightning_meta.cli.main`.
"""

from __future__ import annotations

import sys


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lightning-meta`` and ``python -m lightning_meta``."""
    given = list(sys.argv[1:] if args is None else args)
    if given[:1] == ["--version"]:
        from lightning_meta.version import VERSION

        print(f"lightning-meta {VERSION}")
        return
    from lightning_meta.cli import main as run

    run(args)


if __name__ == "__main__":
    main()
