"""User-facing errors.

Every error a user can cause (bad config, missing model, unreachable catalog, corrupt asset)
is raised as a :class:`RaysamError` whose message is one line naming the problem and the fix.
The entrypoints print that line and exit non-zero without a stack trace.
"""

import re
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


_REMOTE_ERROR_RE = re.compile(r"raysam\.errors\.(ConfigError|ModelError|DataError|RaysamError): (.+)")


def user_error_in(err: BaseException) -> RaysamError | None:
    """The :class:`RaysamError` behind an exception that Ray wrapped, if there is one.

    A task's error comes back as ``RayTaskError`` with the original in its cause chain; an
    actor that failed in its constructor comes back as ``ActorDiedError`` with the original
    only in its message text. Either way the user should see our one line, not Ray's report.
    """
    seen: set[int] = set()
    stack: list[BaseException | None] = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RaysamError) and getattr(e, "cause", None) is None:
            return e  # ours, not Ray's wrapper of it (RayTaskError(DataError) is a DataError too)
        stack.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
    match = _REMOTE_ERROR_RE.search(str(err))
    if match:
        return {"ConfigError": ConfigError, "ModelError": ModelError, "DataError": DataError,
                "RaysamError": RaysamError}[match.group(1)](match.group(2))
    return None
