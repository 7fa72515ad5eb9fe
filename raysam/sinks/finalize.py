"""The last writes of a date group, once its tiles and parts exist: single files and the quicklook.

Below ``output.single_file_max_mpx`` (a county-sized run) users also get one file per raster and
one ``masks.parquet``: :func:`single_cog` copies a mosaic into one COG, :func:`single_parquet`
concatenates the parts in id order. :func:`write_quicklook` stitches the tiles' previews. Each is
one Ray task; none holds more than a tile's worth of pixels, except :func:`single_cog`, whose
GDAL copy streams block by block.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rasterio._err import CPLE_BaseError

from raysam.layout import MASKS_PARQUET, QUICKLOOK, QUICKLOOK_WORLD, GroupSpec
from raysam.sinks.cog import cog_from_mosaic
from raysam.sinks.geoparquet import GeoParquetWriter
from raysam.sinks.quicklook import QuicklookFrame, png_bytes, render
from raysam.sinks.style import georeferencing
from raysam.storage.backends import storage_error
from raysam.tiles import TileRC


@contextlib.contextmanager
def _local_view(spec: GroupSpec, rel_paths: Sequence[str]) -> Iterator[Path]:
    """A local directory holding ``rel_paths`` of the group's write directory (itself, on local roots)."""
    if spec.root.is_local:
        yield Path(spec.write_dir)
        return
    with tempfile.TemporaryDirectory(prefix="raysam-final-") as tmp:
        for rel in rel_paths:
            dest = Path(tmp, rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(spec.root.storage.read_bytes(spec.out(rel)))
        yield Path(tmp)


def single_cog(spec: GroupSpec, vrt_rel: str, tile_rels: Sequence[str], out_rel: str, overview_resampling: str,
               predictor: int = 1) -> float:
    """Copy the mosaic ``vrt_rel`` (over ``tile_rels``) into one COG ``out_rel``; returns seconds."""
    t0 = time.perf_counter()
    with _local_view(spec, [vrt_rel, *tile_rels]) as local, spec.root.storage.put_file(spec.out(out_rel)) as out:
        try:
            cog_from_mosaic(local / vrt_rel, out, overview_resampling, predictor)
        except CPLE_BaseError as err:  # GDAL's own write error ("write error at scanline"): one line too
            raise storage_error(spec.write_dir, err) from None
    return time.perf_counter() - t0


def single_parquet(spec: GroupSpec, part_rels: Sequence[str]) -> float:
    """Concatenate the GeoParquet parts (in the given, id, order) into ``masks.parquet``; returns seconds."""
    t0 = time.perf_counter()
    with spec.root.storage.put_file(spec.out(MASKS_PARQUET)) as local:
        writer = GeoParquetWriter(local, spec.group.id)
        for rel in part_rels:
            writer.write(pq.read_table(pa.BufferReader(spec.root.storage.read_bytes(spec.out(rel)))))
        writer.close()
    return time.perf_counter() - t0


def write_quicklook(spec: GroupSpec, frame: QuicklookFrame, label_tiles: Sequence[tuple[TileRC, Sequence[int]]],
                    rgb_tiles: Sequence[tuple[TileRC, Sequence[int]]]) -> float:
    """Render ``quicklook.png`` and its world file from the tiles' previews; returns seconds."""
    t0 = time.perf_counter()
    image = render(frame, _previews(spec, "labels", label_tiles), _previews(spec, "rgb", rgb_tiles))
    world, aux = georeferencing(frame.transform(spec.group.grid.transform), spec.group.grid.crs)
    spec.root.storage.put_bytes(spec.out(QUICKLOOK), png_bytes(image))
    spec.root.storage.put_bytes(spec.out(QUICKLOOK_WORLD), world.encode())
    spec.root.storage.put_bytes(spec.out(QUICKLOOK + ".aux.xml"), aux.encode())
    return time.perf_counter() - t0


def _previews(spec: GroupSpec, kind: str, tiles: Sequence[tuple[TileRC, Sequence[int]]]) -> Iterator:
    for tile, window in tiles:
        path = spec.preview(kind, tile)
        if spec.root.storage.exists(path):
            yield window, np.load(io.BytesIO(spec.root.storage.read_bytes(path)))
