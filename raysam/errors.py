"""User-facing errors.

Every error a user can cause (bad config, missing model, unreachable catalog, corrupt asset)
is raised as a :class:`RaysamError` whose message is one line naming the problem and the fix.
The entrypoints print that line and exit non-zero without a stack trace.
"""

import sys
from collections.abc import Callable


class RaysamError(Exception):
    """A problem the user can fix; ``str(err)`` is one line that says what and how."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ConfigError(RaysamError, ValueError):
    """A parameter or config value is of the wrong type or out of range."""


class ModelError(RaysamError):
    """A model directory is missing, truncated or does not match its manifest."""


class DataError(RaysamError):
    """Input data (region, catalog, items, assets) is missing, invalid or unreachable."""


USAGE_EXIT_CODE = 2  # what raysam's entry points return for a RaysamError


def run_cli(body: Callable[[], object]) -> int:
    """Run a command-line tool's body: 0 when it returns; for a :class:`RaysamError`, its one
    line on stderr (no stack trace) and :data:`USAGE_EXIT_CODE`."""
    try:
        body()
    except RaysamError as err:
        print(f"error: {err}", file=sys.stderr)
        return USAGE_EXIT_CODE
    return 0
