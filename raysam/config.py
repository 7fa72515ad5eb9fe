"""Typed run configuration: the Hydra schema and its validation.

This is the only module that knows Hydra/OmegaConf. ``conf/config.yaml`` composes the groups
on top of the :class:`RunSchema` registered here, so an unknown key or a value of the wrong
type fails while composing; :func:`to_run_config` then turns the composed DictConfig into plain
frozen dataclasses and validates ranges (one-line :class:`~raysam.errors.ConfigError`) before
anything starts. Stage code only ever sees :class:`RunConfig`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysam.errors import ConfigError

REDACTED = "<redacted>"
DEMO_URL_PLACEHOLDER = "http://127.0.0.1:0"
PC_KEY_ENV = "PC_SDK_SUBSCRIPTION_KEY"
SINKS = ("segmentation_mask", "s2_raster", "quicklook")


# ---------------------------------------------------------------------------------------------
# Schema (OmegaConf structured configs: primitive fields only)
# ---------------------------------------------------------------------------------------------
@dataclass
class RegionSchema:
    name: str = "???"
    geometry: str = "???"  # "minx,miny,maxx,maxy" (lon/lat), WKT, or a GeoJSON/GeoParquet path
    time_range: list[str] = field(default_factory=lambda: ["???", "???"])
    max_cloud_cover: float | None = None  # percent, per item (eo:cloud_cover)
    min_tile_cover: float = 0.4  # fraction of the AOI a date must cover (as raysam.region.RegionSpec)
    max_tiles_per_date: int | None = None
    utm_epsg: int | None = None  # target grid CRS; default: UTM zone of the AOI centroid


@dataclass
class StacSchema:
    kind: str = "planetary_computer"  # planetary_computer | local | demo
    url: str | None = None
    collection: str = "sentinel-2-l2a"
    sign: bool = True
    pc_key: str | None = None
    page_size: int = 100
    max_items: int | None = None
    timeout_s: float = 30.0
    retries: int = 3
    backoff_s: float = 0.5
    demo_root: str | None = None  # kind=demo: where the synthetic catalog is built


@dataclass
class ModelSchema:
    type: str = "vit_b"
    path: str = "models/vit_b"


@dataclass
class SamSchema:
    spatial_overlap: float = 0.5
    points_per_side: int = 16
    n_crop_layers: int = 0
    crop_overlap_ratio: float = 0.0
    crop_n_points_downscale_factor: int = 1
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    points_per_batch: int = 16
    chip_nms_thr: float = 0.7
    mask_nms_thr: float = 0.5
    multimask: bool = True
    prompts: str = "grid"
    coverage_min_area_px: int = 400
    coverage_max_rounds: int = 3
    coverage_max_points: int = 150
    merge_iou: str = "mask"
    band_names: list[str] = field(default_factory=lambda: ["R", "G", "B"])
    band_scaling: list[float] | None = None
    band_offset: list[float] | None = None
    scaling: str = "reflectance"
    max_cloud_fraction: float = 0.8


@dataclass
class RaySchema:
    address: str | None = None
    sam_actors: int = 1
    sam_actors_max: int | None = None
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    read_cpus: float = 1.0
    read_concurrency: int | None = None
    max_task_retries: int = 3
    object_store_gb: float | None = None


@dataclass
class OutputSchema:
    root: str = "outputs"
    sinks: list[str] = field(default_factory=lambda: list(SINKS))
    s2_bands: list[str] = field(default_factory=lambda: ["B02", "B03", "B04", "B08"])
    overwrite: bool = False


@dataclass
class NetworkSchema:
    """COG reads over HTTP: see :class:`raysam.read.NetworkPolicy` (GDAL_HTTP_* env vars win)."""

    timeout_s: float = 30.0
    connect_timeout_s: float = 10.0
    gdal_retries: int = 4
    gdal_retry_delay_s: float = 1.0
    tries: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0


@dataclass
class RunSchema:
    region: RegionSchema = field(default_factory=RegionSchema)
    stac: StacSchema = field(default_factory=StacSchema)
    model: ModelSchema = field(default_factory=ModelSchema)
    sam: SamSchema = field(default_factory=SamSchema)
    ray: RaySchema = field(default_factory=RaySchema)
    output: OutputSchema = field(default_factory=OutputSchema)
    network: NetworkSchema = field(default_factory=NetworkSchema)
    dry_run: bool = False
    device: str = "auto"
    verbose: bool = False


def register_schema() -> None:
    """Register :class:`RunSchema` as ``raysam_schema`` in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="raysam_schema", node=RunSchema)


register_schema()


# ---------------------------------------------------------------------------------------------
# Validated run configuration (what stage code sees)
# ---------------------------------------------------------------------------------------------
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_path_component(value: str, what: str) -> str:
    """Refuse names that could escape the output root when used as a path component."""
    _check(
        isinstance(value, str) and bool(_SAFE_NAME.fullmatch(value)) and ".." not in value,
        f"{what}={value!r} is not a safe name: use letters, digits, '-', '_' and '.' only",
    )
    return value


@dataclass(frozen=True)
class ModelConfig:
    """Which ONNX model directory to load (see :mod:`raysam.sam.contract`)."""

    type: str
    path: str


@dataclass(frozen=True)
class ChipConfig:
    """How chips are planned and turned into RGB uint8 for SAM (seed: band_names etc.)."""

    spatial_overlap: float = 0.5
    band_names: tuple[str, ...] = ("R", "G", "B")
    band_scaling: tuple[float, ...] | None = None
    band_offset: tuple[float, ...] | None = None
    scaling: str = "reflectance"
    max_cloud_fraction: float = 0.8

    def __post_init__(self) -> None:
        _check(
            0.0 <= self.spatial_overlap < 1.0,
            f"sam.spatial_overlap={self.spatial_overlap} is out of range: use a value in [0, 1)",
        )
        _check(len(self.band_names) == 3, f"sam.band_names={list(self.band_names)}: give exactly 3 bands (R, G, B)")
        for name, values in (("band_scaling", self.band_scaling), ("band_offset", self.band_offset)):
            _check(
                values is None or len(values) == len(self.band_names),
                f"sam.{name} has {len(values or ())} values for {len(self.band_names)} bands: give one per band or null",
            )
        _check(self.scaling in ("reflectance", "stretch"), f"sam.scaling={self.scaling!r}: use reflectance or stretch")
        _check(
            0.0 <= self.max_cloud_fraction <= 1.0,
            f"sam.max_cloud_fraction={self.max_cloud_fraction} is out of range: use a value in [0, 1]",
        )


@dataclass(frozen=True)
class MergeConfig:
    """Cross-chip merge (seed: mask_nms_thr)."""

    mask_nms_thr: float = 0.5
    iou_mode: str = "mask"

    def __post_init__(self) -> None:
        _check(
            0.0 < self.mask_nms_thr <= 1.0,
            f"sam.mask_nms_thr={self.mask_nms_thr} is out of range: use a value in (0, 1]",
        )
        _check(self.iou_mode in ("mask", "box"), f"sam.merge_iou={self.iou_mode!r}: use mask or box")


@dataclass(frozen=True)
class RayConfig:
    """Ray resources and retries. The seed's ``num_workers`` is ``sam_actors``.

    ``max_task_retries`` bounds the in-task retries of transient I/O errors in chip reads and
    SAM calls; lost workers and nodes are retried without limit
    (:func:`raysam.pipeline.configure_retries`).
    """

    address: str | None = None
    sam_actors: int = 1
    sam_actors_max: int | None = None
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    read_cpus: float = 1.0
    read_concurrency: int | None = None
    max_task_retries: int = 3
    object_store_gb: float | None = None

    def __post_init__(self) -> None:
        _check(self.sam_actors >= 1, f"ray.sam_actors={self.sam_actors}: use a positive integer")
        _check(
            self.sam_actors_max is None or self.sam_actors_max >= self.sam_actors,
            f"ray.sam_actors_max={self.sam_actors_max} is below ray.sam_actors={self.sam_actors}",
        )
        for name in ("gpus_per_actor", "cpus_per_actor", "read_cpus"):
            _check(getattr(self, name) >= 0, f"ray.{name}={getattr(self, name)}: use a value >= 0")
        _check(self.max_task_retries >= 0, f"ray.max_task_retries={self.max_task_retries}: use a value >= 0")


@dataclass(frozen=True)
class OutputConfig:
    """Where and what to write."""

    root: str = "outputs"
    sinks: tuple[str, ...] = SINKS
    s2_bands: tuple[str, ...] = ("B02", "B03", "B04", "B08")
    overwrite: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.sinks) - set(SINKS))
        _check(not unknown, f"output.sinks has unknown sink(s) {unknown}: choose from {list(SINKS)}")
        _check(bool(self.root), "output.root is empty: give a local path or a URI (s3://bucket/prefix)")


@dataclass(frozen=True)
class RunConfig:
    """The validated configuration of one run. ``stac`` holds the (secret) key; see :func:`redacted`."""

    region: Any  # raysam.region.RegionSpec
    stac: Any  # raysam.stac.StacConfig
    demo_catalog: str | None  # stac=demo: root of the synthetic catalog, served for the run
    model: ModelConfig
    amg: Any  # raysam.sam.params.AmgParams
    chip: ChipConfig
    merge: MergeConfig
    ray: RayConfig
    output: OutputConfig
    network: Any = None  # raysam.read.NetworkPolicy (None: its defaults)
    dry_run: bool = False
    device: str = "auto"
    verbose: bool = False

    def __post_init__(self) -> None:
        _check(self.device in ("auto", "cuda", "cpu"), f"device={self.device!r}: use auto, cuda or cpu")


def _plain(cfg: Any, key: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg[key], resolve=True)


def to_run_config(cfg: Any) -> RunConfig:
    """Validate a composed Hydra config and build the typed :class:`RunConfig`.

    Raises:
        ConfigError: one line naming the bad value and what to use instead.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from raysam.read import NetworkPolicy
    from raysam.region import RegionSpec
    from raysam.sam.contract import MODEL_TYPES
    from raysam.sam.params import AmgParams
    from raysam.stac import StacConfig

    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"config is incomplete or invalid: {str(err).splitlines()[0]}") from None
    region, stac, model, sam, ray_cfg, output = (_plain(cfg, k) for k in ("region", "stac", "model", "sam", "ray", "output"))
    check_path_component(region["name"], "region.name")
    _check(model["type"] in MODEL_TYPES, f"model.type={model['type']!r} is unknown: use one of {list(MODEL_TYPES)}")
    stac["pc_key"] = stac.get("pc_key") or os.environ.get(PC_KEY_ENV) or None
    demo_root = stac.pop("demo_root", None)
    demo_catalog = None
    if stac["kind"] == "demo":  # served on a free port once the run starts (raysam.driver)
        demo_catalog = str(Path(demo_root or "demo_data") / "catalog")
        stac.update(kind="local", url=DEMO_URL_PLACEHOLDER, sign=False)
    return RunConfig(
        region=RegionSpec(
            name=region["name"], geometry=region["geometry"], time_range=tuple(region["time_range"]),
            max_cloud_cover=region["max_cloud_cover"], min_tile_cover=region["min_tile_cover"],
            max_tiles_per_date=region["max_tiles_per_date"], utm_epsg=region["utm_epsg"],
        ),
        stac=StacConfig(**stac),
        demo_catalog=demo_catalog,
        model=ModelConfig(**model),
        amg=AmgParams(
            points_per_side=sam["points_per_side"], points_per_batch=sam["points_per_batch"],
            pred_iou_thresh=sam["pred_iou_thresh"], stability_score_thresh=sam["stability_score_thresh"],
            stability_score_offset=sam["stability_score_offset"], chip_nms_thr=sam["chip_nms_thr"],
            n_crop_layers=sam["n_crop_layers"], crop_overlap_ratio=sam["crop_overlap_ratio"],
            crop_n_points_downscale_factor=sam["crop_n_points_downscale_factor"], multimask=sam["multimask"],
            prompts=sam["prompts"], coverage_min_area_px=sam["coverage_min_area_px"],
            coverage_max_rounds=sam["coverage_max_rounds"], coverage_max_points=sam["coverage_max_points"],
        ),
        chip=ChipConfig(
            spatial_overlap=sam["spatial_overlap"], band_names=tuple(sam["band_names"]),
            band_scaling=tuple(sam["band_scaling"]) if sam["band_scaling"] is not None else None,
            band_offset=tuple(sam["band_offset"]) if sam["band_offset"] is not None else None,
            scaling=sam["scaling"], max_cloud_fraction=sam["max_cloud_fraction"],
        ),
        merge=MergeConfig(mask_nms_thr=sam["mask_nms_thr"], iou_mode=sam["merge_iou"]),
        ray=RayConfig(**ray_cfg),
        output=OutputConfig(
            root=output["root"], sinks=tuple(output["sinks"]), s2_bands=tuple(output["s2_bands"]),
            overwrite=output["overwrite"],
        ),
        network=NetworkPolicy(**_plain(cfg, "network")),
        dry_run=bool(cfg.dry_run),
        device=str(cfg.device),
        verbose=bool(cfg.verbose),
    )


def redacted(value: Any, secrets: list[str]) -> Any:
    """A deep copy of a plain structure with every secret string replaced by ``<redacted>``."""
    if isinstance(value, dict):
        return {k: REDACTED if k == "pc_key" and v else redacted(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redacted(v, secrets) for v in value)
    if isinstance(value, str):
        for secret in secrets:
            if secret:
                value = value.replace(secret, REDACTED)
    return value
