"""Publishing a date group: where its writers put files, and how the result appears whole.

* **Local roots** (:class:`LocalPublisher`): writers fill a hidden staging directory next to the
  group's directory (``.<group>.staging-<id>``); publishing writes the completion marker into it
  and renames it into place, so the group appears at once.
* **Object stores** (:class:`ObjectStorePublisher`): there is no rename, so writers PUT straight
  into the group's directory, which is emptied first (marker first); publishing PUTs the marker
  last. Until then the directory has no marker and counts as incomplete.

Either way a reader that trusts only directories with a marker never sees a half-result.
"""

from __future__ import annotations

import uuid

from raysam.storage.root import MARKER, OutputRoot

# What interrupted runs leave next to a group directory (staging, replaced outputs, temp files).
LEFTOVER_INFIXES = (".staging-", ".old-", ".tmp-")


def _split(group_dir: str) -> tuple[str, str]:
    parent, name = group_dir.rsplit("/", 1)
    return parent, name


class LocalPublisher:
    """Staging directory beside the group, renamed into place on publish."""

    def begin(self, root: OutputRoot, group_dir: str) -> str:
        """A fresh, empty directory for the group's writers."""
        parent, name = _split(group_dir)
        write_dir = f"{parent}/.{name}.staging-{uuid.uuid4().hex[:8]}"
        root.storage.makedirs(write_dir)
        return write_dir

    def publish(self, root: OutputRoot, write_dir: str, group_dir: str, marker: dict) -> None:
        """Write the marker into the staging directory and move it to ``group_dir``."""
        root.write_json(f"{write_dir}/{MARKER}", marker)
        if root.storage.exists(group_dir):  # an incomplete or outdated earlier attempt: set aside, drop
            parent, name = _split(group_dir)
            trash = f"{parent}/.{name}.old-{uuid.uuid4().hex[:8]}"
            root.storage.rename_dir(group_dir, trash)
            root.storage.delete_tree(trash)
        root.storage.rename_dir(write_dir, group_dir)

    def abort(self, root: OutputRoot, write_dir: str) -> None:
        """Drop everything written so far (published outputs are untouched)."""
        root.storage.delete_tree(write_dir)

    def remove_leftovers(self, root: OutputRoot, group_dir: str) -> int:
        """Delete what interrupted runs left next to ``group_dir``; call only while holding its lock.

        Returns:
            How many staging/temporary entries were removed.
        """
        parent, name = _split(group_dir)
        prefix = f".{name}."
        removed = 0
        for entry in root.storage.list_names(parent):
            rest = entry[len(prefix):] if entry.startswith(prefix) else ""
            if any(rest.startswith(i[1:]) for i in LEFTOVER_INFIXES) or rest.startswith("lock."):
                root.storage.delete_tree(f"{parent}/{entry}")
                removed += 1
        return removed


class ObjectStorePublisher:
    """Writers PUT into the group directory itself; the marker is PUT last."""

    def begin(self, root: OutputRoot, group_dir: str) -> str:
        """Empty ``group_dir`` (its marker first, so it never looks complete meanwhile)."""
        root.storage.delete_file(f"{group_dir}/{MARKER}")
        root.storage.delete_tree(group_dir)
        return group_dir

    def publish(self, root: OutputRoot, write_dir: str, group_dir: str, marker: dict) -> None:
        root.write_json(f"{group_dir}/{MARKER}", marker)

    def abort(self, root: OutputRoot, write_dir: str) -> None:
        root.storage.delete_tree(write_dir)

    def remove_leftovers(self, root: OutputRoot, group_dir: str) -> int:
        """Nothing to do: :meth:`begin` empties the group directory."""
        return 0


def publisher_for(root: OutputRoot) -> LocalPublisher | ObjectStorePublisher:
    """The publisher that fits the root's storage."""
    return LocalPublisher() if root.is_local else ObjectStorePublisher()
