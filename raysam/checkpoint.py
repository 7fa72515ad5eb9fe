"""Chip checkpoints: one Parquet shard per chip in the date group's work directory.

As soon as a worker has segmented a chip (or decided to skip it: no valid pixels, too cloudy)
it stores the chip's MaskRecords (:data:`raysam.records.RECORD_SCHEMA`) as
``<collection>/.work/<group>/chips/<row>_<col>.parquet``, atomically (temporary name and
rename, or one PUT). The shard's key-value metadata holds a :class:`ChipOutcome` and the group
fingerprint; pages carry CRC checksums. A re-run of the same group skips every chip with a
valid shard, so a killed run redoes at most the chips that were in flight; a shard that fails
to read, carries another fingerprint or disagrees with its metadata is corrupt: it is deleted
and its chip redone, never trusted.

The work directory holds ``fingerprint.json``; one left by a different fingerprint is removed
when the group is claimed, and the whole directory goes away when the group publishes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from raysam.records import RECORD_SCHEMA
from raysam.storage.root import OutputRoot

log = logging.getLogger(__name__)

WORK_DIR = ".work"  # beside the group directories of a collection
FINGERPRINT_FILE = "fingerprint.json"
CHIPS_DIR = "chips"
SHARD_SUFFIX = ".parquet"
SHARD_META_KEY = b"raysam.chip"
SEGMENTED, SKIPPED = "segmented", "skipped"


class CorruptShard(Exception):
    """A checkpoint shard that cannot be trusted; the message says why."""


@dataclass(frozen=True)
class ChipOutcome:
    """What happened to one chip, as stored with its shard.

    Attributes:
        chip_id: (row, col) in the chip lattice.
        status: ``segmented`` or ``skipped``.
        reason: why a chip was skipped (``no valid pixels``, ``cloudy ...``); empty otherwise.
        n_masks: MaskRecords in the shard.
        decoder_prompts: prompts the mask decoder ran on for this chip.
        sam_s: seconds the SAM stage spent on the chip (0 when skipped).
    """

    chip_id: tuple[int, int]
    status: str
    reason: str = ""
    n_masks: int = 0
    decoder_prompts: int = 0
    sam_s: float = 0.0


@dataclass(frozen=True)
class ShardTarget:
    """Where one date group's chip checkpoints go: all a read task or SAM actor needs of the group.

    Attributes:
        root: the output root (pickles as its URI).
        work_dir: the group's work directory.
        fingerprint: the group fingerprint the shards carry.
    """

    root: OutputRoot
    work_dir: str
    fingerprint: str

    def write(self, outcome: ChipOutcome, records: pa.Table) -> None:
        """:func:`write_shard` into this group's work directory."""
        write_shard(self.root, self.work_dir, self.fingerprint, outcome, records)


def work_dir(collection_dir: str, group_name: str) -> str:
    """The work directory of a date group: ``<collection>/.work/<group>``."""
    return f"{collection_dir}/{WORK_DIR}/{group_name}"


def shard_path(group_work_dir: str, chip_id: tuple[int, int]) -> str:
    """Where the shard of ``chip_id`` lives."""
    return f"{group_work_dir}/{CHIPS_DIR}/{int(chip_id[0]):05d}_{int(chip_id[1]):05d}{SHARD_SUFFIX}"


def write_shard(root: OutputRoot, group_work_dir: str, fingerprint: str, outcome: ChipOutcome,
                records: pa.Table) -> None:
    """Store one chip's records and outcome atomically (``records`` may have no rows)."""
    meta = json.dumps({"fingerprint": fingerprint, **asdict(outcome)}).encode()
    table = records.cast(RECORD_SCHEMA).replace_schema_metadata({SHARD_META_KEY: meta})
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd", write_page_checksum=True)
    root.storage.put_bytes(shard_path(group_work_dir, outcome.chip_id), buf.getvalue().to_pybytes())


def read_shard(root: OutputRoot, path: str, fingerprint: str) -> tuple[ChipOutcome, pa.Table]:
    """A shard's outcome and records, verified.

    Raises:
        FileNotFoundError: there is no shard at ``path``.
        CorruptShard: it is truncated, damaged, from another fingerprint, or inconsistent.
    """
    data = root.storage.read_bytes(path)
    try:
        table = pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
        meta = json.loads((table.schema.metadata or {})[SHARD_META_KEY])
    except Exception as err:  # noqa: BLE001 - any failure to parse means "do not trust it"
        raise CorruptShard(f"unreadable ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if meta.pop("fingerprint", None) != fingerprint:
        raise CorruptShard("written for another configuration")
    try:
        outcome = ChipOutcome(**{**meta, "chip_id": tuple(meta["chip_id"])})
    except (TypeError, KeyError) as err:
        raise CorruptShard(f"bad metadata ({err})") from None
    if table.num_rows != outcome.n_masks or outcome.status not in (SEGMENTED, SKIPPED):
        raise CorruptShard(f"{table.num_rows} rows where its metadata says {outcome.n_masks} ({outcome.status})")
    if not table.schema.remove_metadata().equals(RECORD_SCHEMA):
        raise CorruptShard("columns differ from the MaskRecord schema")
    return outcome, table.replace_schema_metadata(None)


def resume_outcome(root: OutputRoot, group_work_dir: str, chip_id: tuple[int, int], fingerprint: str,
                   group_id: str) -> ChipOutcome | None:
    """The outcome of an already checkpointed chip, or None when the chip must be (re)done.

    A corrupt shard is deleted, with one log line, and the chip redone.
    """
    path = shard_path(group_work_dir, chip_id)
    try:
        outcome, _ = read_shard(root, path, fingerprint)
    except FileNotFoundError:
        return None
    except CorruptShard as err:
        log.warning("date group %s chip %d_%d: checkpoint %s is corrupt (%s); redoing the chip",
                    group_id, chip_id[0], chip_id[1], path, err)
        root.storage.delete_file(path)
        return None
    return outcome


def prepare_work_dir(root: OutputRoot, group_work_dir: str, fingerprint: str, group_id: str) -> int:
    """Make the group's work directory ready for this fingerprint; return the shards already in it.

    A work directory left by a different fingerprint (another configuration, other items) is
    removed first. Call only while holding the group's lock.
    """
    if _is_ours(root, group_work_dir, fingerprint):
        return count_shards(root, group_work_dir)
    if root.storage.exists(group_work_dir):
        log.info("date group %s: removed a work directory left by another configuration (%s)",
                 group_id, group_work_dir)
        root.storage.delete_tree(group_work_dir)
    root.write_json(f"{group_work_dir}/{FINGERPRINT_FILE}", {"fingerprint": fingerprint, "group": group_id})
    return 0


def count_shards(root: OutputRoot, group_work_dir: str) -> int:
    """How many chip shards the work directory holds (listed, not verified)."""
    return sum(1 for n in root.storage.list_names(f"{group_work_dir}/{CHIPS_DIR}")
               if n.endswith(SHARD_SUFFIX) and not n.startswith("."))


def checkpointed_chips(root: OutputRoot, group_work_dir: str, fingerprint: str) -> int:
    """Chips already checkpointed for this fingerprint (0 when the work directory is another's)."""
    return count_shards(root, group_work_dir) if _is_ours(root, group_work_dir, fingerprint) else 0


def _is_ours(root: OutputRoot, group_work_dir: str, fingerprint: str) -> bool:
    stored = root.read_json(f"{group_work_dir}/{FINGERPRINT_FILE}")
    return stored is not None and stored.get("fingerprint") == fingerprint
