"""The console of a run: raysam's own lines, warnings that need the user, nothing else.

Hydra's job logging (``conf/config.yaml``) writes every record to the run's log file
(``<hydra run dir>/run.log``) and passes the console (stdout; stderr is kept for the one line of
an error) only what :class:`ConsoleFilter` lets through: raysam's INFO and above, CRITICAL of the
chatty libraries in :data:`CHATTY` (Ray's warnings are about Ray's own choices: token auth for the
local instance raysam starts, progress bars, memory reservations; its errors restate, with stack
traces, a failed task or actor that reaches the driver as an exception, which the command line
reports in one line; urllib3's are retries raysam reports itself when they run out), everyone
else's WARNING and above. Ray starts without its own log handlers (``configure_logging=False``)
so its records come here, and
:func:`route_ray_logs` does the same for Ray Data's console handler (its own file,
``ray-data.log`` in the Ray session, keeps everything) and for what Ray forwards from worker
processes (``log_to_driver``): their lines go to the run's log, not the console.
"""

from __future__ import annotations

import logging
import re

# ``log.error(..., extra=FILE_ONLY)``: the record goes to the run's log file, never to the console
# (the full traceback of an error whose one line the command line prints itself).
FILE_ONLY = {"console": False}


CHATTY = ("ray", "urllib3")


class ConsoleFilter(logging.Filter):
    """raysam's records from INFO, :data:`CHATTY` libraries' at CRITICAL, the others' from WARNING;
    none marked :data:`FILE_ONLY`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "console", True):  # logged with extra=FILE_ONLY
            return False
        if _under(record.name, "raysam"):
            return record.levelno >= logging.INFO
        if any(_under(record.name, name) for name in CHATTY):
            return record.levelno >= logging.CRITICAL
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
            handler.setLevel(logging.CRITICAL)


WORKER_LOGGER = "ray.workers"  # what worker processes print, forwarded by Ray: the run's log only
AUTOSCALER_KEEP = re.compile(r"WARN|ERROR|infeasible|cannot", re.IGNORECASE)  # autoscaler lines worth a log line


def route_worker_output() -> None:
    """Write what Ray forwards from worker processes (``log_to_driver``) to the run's log, one
    record per line on the ``ray.workers`` logger, instead of printing it to the console: a
    failing task's or actor's traceback reaches the driver as an exception anyway, and the
    command line reports it in one line. Call after ``ray.init``; without Ray's (private)
    dispatcher it leaves Ray's printing as it is."""
    try:
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    worker_log = logging.getLogger(WORKER_LOGGER)

    def to_log(data: dict) -> None:
        who = f"({data.get('actor_name') or data.get('task_name') or 'worker'} pid={data.get('pid')})"
        for line in data.get("lines", ()):
            if data.get("pid") == "autoscaler" and not AUTOSCALER_KEEP.search(line):
                continue  # its status table, every 5 s: 20 lines that say nothing a run needs
            worker_log.info("%s %s", who, line)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("raysam_worker_lines")  # once, even if Ray is started again
    dispatcher.add_handler("raysam_worker_lines", to_log)
