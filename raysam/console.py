"""The console of a run: raysam's own lines, warnings that need the user, nothing else.

Hydra's job logging (``conf/config.yaml``) writes every record to the run's log file
(``<hydra run dir>/run.log``) and passes the console only what :class:`ConsoleFilter` lets
through: raysam's INFO and above, Ray's ERROR and above (its warnings are about Ray's own
choices: token auth for the local instance raysam starts, progress bars, memory reservations;
raysam checks what the user must act on itself), everyone else's WARNING and above. Ray starts
without its own log handlers (``configure_logging=False``) so its records come here, and
:func:`route_ray_logs` does the same for Ray Data's console handler (its own file,
``ray-data.log`` in the Ray session, keeps everything).
"""

from __future__ import annotations

import logging

# ``log.error(..., extra=FILE_ONLY)``: the record goes to the run's log file, never to the console
# (the full traceback of an error whose one line the command line prints itself).
FILE_ONLY = {"console": False}


class ConsoleFilter(logging.Filter):
    """raysam's records from INFO, Ray's from ERROR, other libraries' from WARNING; none marked
    :data:`FILE_ONLY`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "console", True):  # logged with extra=FILE_ONLY
            return False
        if _under(record.name, "raysam"):
            return record.levelno >= logging.INFO
        if _under(record.name, "ray"):
            return record.levelno >= logging.ERROR
        return record.levelno >= logging.WARNING


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
