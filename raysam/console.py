"""The console of a run: raysam's own lines, warnings that need the user, nothing else.

Hydra's job logging (``conf/config.yaml``) writes every record to the run's log file
(``<hydra run dir>/run.log``) and passes the console (stdout; stderr is kept for the one line of
an error) only what :class:`ConsoleFilter` lets through: raysam's INFO and above, ERROR and
above of the chatty libraries in :data:`CHATTY` (Ray's warnings are about Ray's own choices:
token auth for the local instance raysam starts, progress bars, memory reservations; urllib3's
are retries raysam reports itself when they run out), everyone else's WARNING and above. Ray starts
without its own log handlers (``configure_logging=False``) so its records come here, and
:func:`route_ray_logs` does the same for Ray Data's console handler (its own file,
``ray-data.log`` in the Ray session, keeps everything).
"""

from __future__ import annotations

import logging


CHATTY = ("ray", "urllib3")


class ConsoleFilter(logging.Filter):
    """raysam's records from INFO, :data:`CHATTY` libraries' from ERROR, the others' from WARNING."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _under(record.name, "raysam"):
            return record.levelno >= logging.INFO
        if any(_under(record.name, name) for name in CHATTY):
            return record.levelno >= logging.ERROR
        return record.levelno >= logging.WARNING


class ConsoleFormatter(logging.Formatter):
    """``raysam: <message>`` for raysam's lines; ``<logger> <level>: <message>`` for the others'."""

    def format(self, record: logging.LogRecord) -> str:
        if _under(record.name, "raysam"):
            return f"raysam: {record.getMessage()}"
        return f"{record.name} {record.levelname.lower()}: {record.getMessage()}"


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def route_ray_logs() -> None:
    """Send the ``ray`` logger's records to our handlers (``import ray`` gives it its own stderr
    handler and stops propagation), and raise Ray Data's console handler to ERROR (its file
    handler keeps every record)."""
    import ray.data  # noqa: F401 - configures Ray's and Ray Data's logging on import

    ray_logger = logging.getLogger("ray")
    for handler in list(ray_logger.handlers):
        ray_logger.removeHandler(handler)
    ray_logger.propagate = True

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler) and type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(logging.ERROR)
