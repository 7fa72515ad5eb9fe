"""User-facing errors.

Every error a user can cause (bad config, missing model, unreachable catalog, corrupt asset)
is raised as a :class:`RaysamError` whose message is one line naming the problem and the fix.
The entrypoints print that line and exit non-zero without a stack trace.
"""


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
