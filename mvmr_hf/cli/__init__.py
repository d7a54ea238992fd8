"""Command-line entry points.

`train.py` holds `mvmr-distill` / `mvmr-pretrain`; `release.py` holds `mvmr-export`,
`mvmr-evaluate`, `mvmr-align` and `mvmr-push`. Every entry point goes through
:func:`run_cli`, so that bad input gets one line and exit status 2, never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from mvmr_hf.errors import ConfigError

USAGE_ERROR = 2


def run_cli(main: Callable[[Sequence[str]], None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; turn user errors into one line on stderr and exit status 2.

    ``--debug`` anywhere in ``argv`` is removed before ``main`` sees it and makes errors
    raise with their full traceback instead.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        main(args)
    except ConfigError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
