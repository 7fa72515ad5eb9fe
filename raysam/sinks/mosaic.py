"""Mosaics: a GDAL VRT over a raster's COG tiles, so every GDAL-based tool opens them as one raster.

The VRT is small metadata (one ``SimpleSource`` per tile, paths relative to the VRT), written by
the driver once the tiles exist. Its size grows with the number of tiles, not with pixels. Below
``output.single_file_max_mpx`` a task also copies the mosaic into one COG
(:func:`raysam.sinks.cog.cog_from_mosaic`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape

from pyproj import CRS

_GDAL_TYPES = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32", "int32": "Int32",
               "float32": "Float32", "float64": "Float64"}


@dataclass(frozen=True)
class MosaicBand:
    """What a VRT says about its one band.

    Attributes:
        dtype: numpy dtype name of the tiles.
        nodata: nodata value.
        description: the band description.
        scale_offset: GDAL scale and offset (physical = DN * scale + offset), if any.
        color_interp: GDAL colour interpretation (``Gray``, ``Undefined``...).
    """

    dtype: str
    nodata: float
    description: str
    scale_offset: tuple[float, float] | None = None
    color_interp: str = "Gray"


def vrt_xml(width: int, height: int, grid_transform: Sequence[float], epsg: int, band: MosaicBand,
            tiles: Sequence[tuple[str, Sequence[int]]]) -> str:
    """A VRT mosaic of single-band tiles on one grid.

    Args:
        width, height: the grid's size.
        grid_transform: its affine (a, b, c, d, e, f).
        epsg: its CRS.
        band: the band's metadata.
        tiles: (path relative to the VRT, window_px (col_off, row_off, w, h)) per tile.
    """
    a, b, c, d, e, f = (float(v) for v in grid_transform[:6])
    gdal_type = _GDAL_TYPES[band.dtype]
    sources = []
    for rel, (x, y, w, h) in tiles:
        sources.append(
            f'    <SimpleSource>\n'
            f'      <SourceFilename relativeToVRT="1">{escape(rel)}</SourceFilename>\n'
            f'      <SourceBand>1</SourceBand>\n'
            f'      <SourceProperties RasterXSize="{w}" RasterYSize="{h}" DataType="{gdal_type}" '
            f'BlockXSize="512" BlockYSize="512"/>\n'
            f'      <SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>\n'
            f'      <DstRect xOff="{x}" yOff="{y}" xSize="{w}" ySize="{h}"/>\n'
            f'      <NODATA>{band.nodata:g}</NODATA>\n'
            f'    </SimpleSource>\n')
    scale = ""
    if band.scale_offset is not None:
        scale = f"    <Offset>{band.scale_offset[1]!r}</Offset>\n    <Scale>{band.scale_offset[0]!r}</Scale>\n"
    return (
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">\n'
        f'  <SRS dataAxisToSRSAxisMapping="1,2">{escape(CRS.from_epsg(epsg).to_wkt())}</SRS>\n'
        f'  <GeoTransform>{c!r}, {a!r}, {b!r}, {f!r}, {d!r}, {e!r}</GeoTransform>\n'
        f'  <VRTRasterBand dataType="{gdal_type}" band="1">\n'
        f'    <Description>{escape(band.description)}</Description>\n'
        f'    <NoDataValue>{band.nodata:g}</NoDataValue>\n'
        f'    <ColorInterp>{band.color_interp}</ColorInterp>\n'
        f'{scale}'
        f'{"".join(sources)}'
        f'  </VRTRasterBand>\n'
        f'</VRTDataset>\n'
    )
