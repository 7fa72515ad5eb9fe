"""Where every file of a date group lives, and what each back-half task needs to know of its group.

Per date group, under ``<output.root>/<region>/<run key>/``::

    <group>/                      published outputs (see the README's Outputs section)
        labels/<r>_<c>.tif        label COG tiles (sink tiles, raysam.tiles)
        labels.vrt                their mosaic; labels.tif too below output.single_file_max_mpx
        masks/part-<r>_<c>.parquet GeoParquet parts, one per merge cell; masks.parquet below the threshold
        s2/<band>/<r>_<c>.tif     Sentinel-2 COG tiles; s2/<band>.vrt; s2/<band>.tif below the threshold
        labels.qml                QGIS style of the labels (one colour per id)
        quicklook.png             with quicklook.pgw and quicklook.png.aux.xml (georeferencing)
        manifest.json  item.json  _COMPLETE.json (last)
    collection.json               STAC collection over the published groups
    .work/<group>/                work files, removed when the group publishes
        fingerprint.json  chips/<row>_<col>.parquet  cells/<r>_<c>.parquet  previews/*.npy

Writers write into ``write_dir``: the group directory itself on object stores, a staging
directory beside it on local roots (:mod:`raysam.storage.publish`).
"""

from __future__ import annotations

from dataclasses import dataclass

from raysam.checkpoint import ShardTarget
from raysam.grid import DEFAULT_CHIP_SIZE, DateGroup
from raysam.storage.root import OutputRoot
from raysam.tiles import CellRC, Tiling, TileRC

LABELS_DIR, LABELS_VRT, LABELS_TIF = "labels", "labels.vrt", "labels.tif"
MASKS_DIR, MASKS_PARQUET = "masks", "masks.parquet"
S2_DIR = "s2"
QUICKLOOK, QUICKLOOK_WORLD = "quicklook.png", "quicklook.pgw"
LABELS_STYLE = "labels.qml"
ITEM = "item.json"
MANIFEST = "manifest.json"


def _rc(rc: tuple[int, int]) -> str:
    return f"{int(rc[0]):03d}_{int(rc[1]):03d}"


def label_tile(tile: TileRC) -> str:
    return f"{LABELS_DIR}/{_rc(tile)}.tif"


def s2_tile(band: str, tile: TileRC) -> str:
    return f"{S2_DIR}/{band}/{_rc(tile)}.tif"


def s2_vrt(band: str) -> str:
    return f"{S2_DIR}/{band}.vrt"


def s2_tif(band: str) -> str:
    return f"{S2_DIR}/{band}.tif"


def polygon_part(cell: CellRC) -> str:
    return f"{MASKS_DIR}/part-{_rc(cell)}.parquet"


@dataclass(frozen=True)
class GroupSpec:
    """What every back-half task of one date group needs: small, picklable, no secrets.

    Attributes:
        group: the date group (items, grid, AOI).
        root: the output root (pickles as its URI).
        fingerprint: the group fingerprint (:func:`raysam.plan.group_fingerprint`).
        out_dir: the published group directory.
        write_dir: where writers put the group's outputs before it is published.
        work_dir: the group's work directory (checkpoints, cell shards, previews).
        chip_bands: the bands chips are read with (RGB + SCL).
        spatial_overlap: the chip overlap the group was planned with.
        chip_px: the chip side.
    """

    group: DateGroup
    root: OutputRoot
    fingerprint: str
    out_dir: str
    write_dir: str
    work_dir: str
    chip_bands: tuple[str, ...]
    spatial_overlap: float
    chip_px: int = DEFAULT_CHIP_SIZE

    @property
    def tiling(self) -> Tiling:
        return Tiling.of(self.group.grid, self.chip_px)

    @property
    def shards(self) -> ShardTarget:
        """Where the group's chip checkpoints go (what the front half's tasks get)."""
        return ShardTarget(self.root, self.work_dir, self.fingerprint)

    def out(self, rel: str) -> str:
        """A path under the directory writers fill."""
        return f"{self.write_dir}/{rel}"

    def cell_shard(self, cell: CellRC) -> str:
        """The merged records a cell owns (kept or unresolved), with their polygons."""
        return f"{self.work_dir}/cells/{_rc(cell)}.parquet"

    def preview(self, kind: str, tile: TileRC) -> str:
        """A tile's quicklook-sized preview (``labels`` or ``rgb``), as .npy."""
        return f"{self.work_dir}/previews/{kind}_{_rc(tile)}.npy"
