"""Output storage: backends (local, object store), the output root, locks and publishing."""

from raysam.storage.root import MARKER, OutputRoot, storage_error

__all__ = ["MARKER", "OutputRoot", "storage_error"]
