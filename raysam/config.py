"""The run configuration: typed, frozen, validated, one definition per setting.

Every setting is one field of one frozen dataclass, which holds its only default and checks it
on construction: :class:`~raysam.region.RegionSpec`, :class:`~raysam.stac.StacConfig`,
:class:`~raysam.sam.params.AmgParams`, :class:`~raysam.scaling.ScalingSpec`,
:class:`~raysam.merge.MergeParams`, :class:`~raysam.remote_io.NetworkPolicy` and, for the
settings with no other home, :class:`ModelConfig`, :class:`ChipConfig`, :class:`RayConfig`,
:class:`OutputConfig` and :class:`RunConfig` itself. :data:`GROUPS` says which of those fields
each group of the YAML tree (``conf/``) holds, under which key; :mod:`raysam.hydra_config`
generates Hydra's schema from it and :func:`from_tree` builds a :class:`RunConfig` from a
composed tree of plain values. Nothing here imports Hydra or OmegaConf, so the Ray workers
that unpickle parts of a config never do.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysam.errors import ConfigError
from raysam.grid import DEFAULT_OVERLAP
from raysam.merge import MergeParams
from raysam.read import DEFAULT_MAX_CLOUD_FRACTION
from raysam.region import RegionSpec
from raysam.remote_io import NetworkPolicy
from raysam.sam.contract import MODEL_TYPES
from raysam.sam.params import AmgParams
from raysam.scaling import ScalingSpec
from raysam.stac import StacConfig

REDACTED = "<redacted>"
DEMO_URL_PLACEHOLDER = "http://127.0.0.1:0"
PC_KEY_ENV = "PC_SDK_SUBSCRIPTION_KEY"
SINKS = ("segmentation_mask", "s2_raster", "quicklook")
DEMO_KIND = "demo"  # stac.kind=demo: the synthetic catalog, served on localhost for the run
# stac=demo searches that local server without signing (its port is known once it runs).
DEMO_STAC = {"kind": "local", "url": DEMO_URL_PLACEHOLDER, "sign": False}
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


# ---------------------------------------------------------------------------------------------
# Settings with no home in a domain module (messages name fields; from_tree adds their group)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    """Which ONNX model directory to load (see :mod:`raysam.sam.contract`)."""

    type: str = "vit_b"
    path: str = "models/vit_b"

    def __post_init__(self) -> None:
        _check(self.type in MODEL_TYPES, f"type={self.type!r} is unknown: use one of {list(MODEL_TYPES)}")


@dataclass(frozen=True)
class ChipConfig:
    """How chips are cut and turned into SAM's RGB uint8 (seed: spatial_overlap, band_names, ...).

    Attributes:
        spatial_overlap: fraction of a chip shared with its neighbour, in [0, 1).
        max_cloud_fraction: skip chips whose valid pixels are cloudier than this, in [0, 1].
        scaling: DN to RGB uint8 (its stretch, if any, is computed once per date group).
    """

    spatial_overlap: float = DEFAULT_OVERLAP
    max_cloud_fraction: float = DEFAULT_MAX_CLOUD_FRACTION
    scaling: ScalingSpec = field(default_factory=ScalingSpec)

    def __post_init__(self) -> None:
        _check(0.0 <= self.spatial_overlap < 1.0,
               f"spatial_overlap={self.spatial_overlap} is out of range: use a value in [0, 1)")
        _check(0.0 <= self.max_cloud_fraction <= 1.0,
               f"max_cloud_fraction={self.max_cloud_fraction} is out of range: use a value in [0, 1]")


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
    sink_tasks: int | None = None  # back-half tasks (merge cells, tiles) at once; None: as many as CPUs
    sink_cpus: float = 1.0  # CPUs each back-half task reserves

    def __post_init__(self) -> None:
        _check(self.sam_actors >= 1, f"sam_actors={self.sam_actors}: use a positive integer")
        _check(self.sink_tasks is None or self.sink_tasks >= 1,
               f"sink_tasks={self.sink_tasks}: use a positive integer or null")
        _check(
            self.sam_actors_max is None or self.sam_actors_max >= self.sam_actors,
            f"sam_actors_max={self.sam_actors_max} is below sam_actors={self.sam_actors}",
        )
        for name in ("gpus_per_actor", "cpus_per_actor", "read_cpus", "sink_cpus"):
            _check(getattr(self, name) >= 0, f"{name}={getattr(self, name)}: use a value >= 0")
        _check(self.max_task_retries >= 0, f"max_task_retries={self.max_task_retries}: use a value >= 0")


@dataclass(frozen=True)
class OutputConfig:
    """Where and what to write."""

    root: str = "outputs"
    sinks: tuple[str, ...] = SINKS
    s2_bands: tuple[str, ...] = ("B02", "B03", "B04", "B08")
    overwrite: bool = False
    single_file_max_mpx: float = 100.0  # grids up to this many megapixels also get single files

    def __post_init__(self) -> None:
        _check(self.single_file_max_mpx >= 0,
               f"single_file_max_mpx={self.single_file_max_mpx}: use a value >= 0 (0: tiles only)")
        unknown = sorted(set(self.sinks) - set(SINKS))
        _check(not unknown, f"sinks has unknown sink(s) {unknown}: choose from {list(SINKS)}")
        _check(bool(self.root), "root is empty: give a local path or a URI (s3://bucket/prefix)")


@dataclass(frozen=True)
class DemoSource:
    """``stac=demo``: where the synthetic catalog is built (then served for the run's duration)."""

    demo_root: str = "demo_data"


@dataclass(frozen=True)
class RunConfig:
    """The validated configuration of one run. ``stac`` holds the (secret) key; see :func:`redacted`."""

    region: RegionSpec
    stac: StacConfig = field(default_factory=StacConfig)
    demo_catalog: str | None = None  # stac=demo: root of the synthetic catalog, served for the run
    model: ModelConfig = field(default_factory=ModelConfig)
    amg: AmgParams = field(default_factory=AmgParams)
    chip: ChipConfig = field(default_factory=ChipConfig)
    merge: MergeParams = field(default_factory=MergeParams)
    ray: RayConfig = field(default_factory=RayConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    dry_run: bool = False
    device: str = "auto"
    verbose: bool = False

    def __post_init__(self) -> None:
        _check(self.device in ("auto", "cuda", "cpu"), f"device={self.device!r}: use auto, cuda or cpu")


# ---------------------------------------------------------------------------------------------
# The YAML tree: which dataclass fields each group holds
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """The settings one dataclass gives a group of the YAML tree.

    Attributes:
        cls: a frozen dataclass; its fields' types, defaults and validation define the settings.
        keys: the YAML key of a field where it differs from the field's name.
        skip: fields that are not settings (derived at run time, or not expressible in YAML).
            A field holding another dataclass is never a setting itself: its own Part fills it.
    """

    cls: type
    keys: Mapping[str, str] = field(default_factory=dict)
    skip: tuple[str, ...] = ()

    def settings(self) -> list[tuple[str, dataclasses.Field, Any]]:
        """(YAML key, field, resolved type) of each setting, in field order."""
        hints = typing.get_type_hints(self.cls)
        return [(self.keys.get(f.name, f.name), f, hints[f.name]) for f in dataclasses.fields(self.cls)
                if f.name not in self.skip and not dataclasses.is_dataclass(hints[f.name])]

    def build(self, group: str, values: Mapping[str, Any], **given: Any) -> Any:
        """The dataclass from a group's plain values (lists become tuples where the field is one).

        Args:
            group: the group's path in the tree (``""`` for the top level), to name settings.
            values: the group's values by YAML key; a missing key keeps the field's default.
            **given: fields set by the caller (nested dataclasses, derived values).

        Raises:
            ConfigError: the dataclass's own message, each setting named by its YAML path.
        """
        kwargs = {f.name: _as_field(values[key], hint) for key, f, hint in self.settings() if key in values}
        try:
            return self.cls(**{**kwargs, **given})
        except ConfigError as err:
            raise ConfigError(self._yaml_names(str(err), group)) from None

    def _yaml_names(self, message: str, group: str) -> str:
        """``message`` with each field named as the user wrote it: ``mask_nms_thr=0`` becomes
        ``sam.mask_nms_thr=0``, ``iou_mode='x'`` becomes ``sam.merge_iou='x'`` (a field's name
        followed by ``=``, or opening the message)."""
        for key, f, _ in self.settings():
            path = f"{group}.{key}" if group else key
            message = re.sub(rf"(?<![\w.]){f.name}(?==)|^{f.name}(?=\s)", path, message)
        return message


def _as_field(value: Any, hint: Any) -> Any:
    """A plain YAML value as the field wants it: a list becomes a tuple for a tuple field."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    members = typing.get_args(hint) if union else (hint,)
    wants_tuple = any(typing.get_origin(m) is tuple for m in members)
    return tuple(value) if wants_tuple and isinstance(value, list) else value


TOP_LEVEL = Part(RunConfig, skip=("demo_catalog",))  # dry_run, device, verbose
# Merge parameters that are algorithm choices, tested for exactness, not user settings.
_MERGE_INTERNALS = ("drop_border_contained", "containment_thr", "border_px", "prefer_interior")
GROUPS: dict[str, tuple[Part, ...]] = {
    "region": (Part(RegionSpec),),
    "stac": (Part(StacConfig), Part(DemoSource)),
    "model": (Part(ModelConfig),),
    "sam": (  # the seed's auto_segment_s2 parameters, flat
        Part(AmgParams, skip=("point_grids",)),
        Part(ChipConfig),
        Part(ScalingSpec, keys={"mode": "scaling"}, skip=("low", "high")),
        Part(MergeParams, keys={"iou_mode": "merge_iou"}, skip=_MERGE_INTERNALS),
    ),
    "ray": (Part(RayConfig),),
    "output": (Part(OutputConfig),),
    "network": (Part(NetworkPolicy),),
}


def from_tree(tree: Mapping[str, Any]) -> RunConfig:
    """Build and validate the run configuration from a composed tree of plain values.

    ``stac.kind=demo`` becomes a local, unsigned search of the synthetic catalog under
    ``stac.demo_root`` (served once the run starts); a missing ``stac.pc_key`` is read from
    ``PC_SDK_SUBSCRIPTION_KEY``.

    Args:
        tree: ``{group: {key: value}}`` plus the top-level keys, as :data:`GROUPS` and
            :data:`TOP_LEVEL` lay them out (a missing key keeps its default).

    Raises:
        ConfigError: one line naming the setting by its YAML path and what to use instead.
    """
    parts = {part.cls: (group, part) for group, group_parts in GROUPS.items() for part in group_parts}

    def make(cls: type, **given: Any) -> Any:
        group, part = parts[cls]
        return part.build(group, tree.get(group, {}), **given)

    stac = tree.get("stac", {})
    demo = stac.get("kind") == DEMO_KIND
    pc_key = stac.get("pc_key") or os.environ.get(PC_KEY_ENV) or None
    return TOP_LEVEL.build(
        "", tree,
        region=make(RegionSpec),
        stac=make(StacConfig, pc_key=pc_key, **(DEMO_STAC if demo else {})),
        demo_catalog=str(Path(make(DemoSource).demo_root) / "catalog") if demo else None,
        model=make(ModelConfig), amg=make(AmgParams), chip=make(ChipConfig, scaling=make(ScalingSpec)),
        merge=make(MergeParams), ray=make(RayConfig), output=make(OutputConfig), network=make(NetworkPolicy),
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
