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
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from raysam.errors import ConfigError
from raysam.grid import DEFAULT_OVERLAP
from raysam.items import check_band_names
from raysam.merge import MergeParams
from raysam.read import DEFAULT_MAX_CLOUD_FRACTION
from raysam.region import RegionSpec
from raysam.remote_io import NetworkPolicy
from raysam.sam.contract import MODEL_TYPES
from raysam.sam.params import AmgParams
from raysam.scaling import ScalingSpec
from raysam.stac import StacConfig

REDACTED = "<redacted>"
MIN_OBJECT_STORE_GB = 0.08  # Ray refuses an object store below 75 MiB (ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES)
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


def expand_user(path: str) -> str:
    """A local path with ``~`` expanded; URIs (``s3://...``) and ``pkg://`` references as given."""
    return path if "://" in path else os.path.expanduser(path)


def _expand(obj: Any, name: str) -> None:
    """Expand ``~`` in a frozen dataclass's path field."""
    value = getattr(obj, name)
    if isinstance(value, str):
        object.__setattr__(obj, name, expand_user(value))


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
        _expand(self, "path")


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


# Back-half tasks a local node's SAM actors leave CPUs for while chips are still read
# (RayConfig.resolved). With one, on 2 CPUs, a finished group's merge and tiles ran one task at a
# time beside the next group's SAM (bench_scale: first group's sink wall 8.4 s, published at 60 %
# of the wall; with two, 5.8 s and 57 %). SAM is niced below them (raysam.pipeline), so the second
# task takes CPU from SAM only while a group finishes.
BACK_HALF_TASKS_BESIDE_SAM = 2


@dataclass(frozen=True)
class RayConfig:
    """Ray resources, retries and time limits. The seed's ``num_workers`` is ``sam_actors``.

    ``max_task_retries`` bounds the in-task retries of transient I/O errors in chip reads and
    SAM calls; lost workers and nodes are retried without limit
    (:func:`raysam.pipeline.configure_retries`). The SAM actors (``sam_actors`` of
    ``cpus_per_actor``/``gpus_per_actor``), a chip read (``read_cpus``) and a back-half task
    (``sink_cpus``) must fit in the cluster at once (:mod:`raysam.preflight`); with
    ``autoscale_wait_s`` an autoscaling cluster gets that long to grow to them.

    ``cpus_per_actor`` null (the default, for a laptop or one machine) gives the SAM actors the
    node's CPUs but what one chip read and two back-half tasks reserve (:meth:`resolved`): SAM is
    the bulk of the work, and ONNX Runtime runs on ``ceil(cpus_per_actor)`` threads. Reads and
    back-half tasks are light by default (``read_cpus``/``sink_cpus`` 0.25) so they run beside it.

    A run on this machine (no ``address``, no ``RAY_ADDRESS``) with at most
    ``in_process_max_chips`` chips to segment does not start Ray: it runs in process
    (:mod:`raysam.inprocess`), with the same outputs. 0 always starts Ray.
    """

    address: str | None = None
    sam_actors: int = 1
    sam_actors_max: int | None = None
    gpus_per_actor: float = 0.0
    cpus_per_actor: float | None = None  # None: the node's CPUs less a read's and two sink tasks'
    read_cpus: float = 0.25
    read_concurrency: int | None = None
    max_task_retries: int = 3
    object_store_gb: float | None = None
    sink_tasks: int | None = None  # back-half tasks (merge cells, tiles) at once; None: as many as fit (back_half_tasks)
    sink_cpus: float = 0.25  # CPUs each back-half task reserves
    timeout_s: float = 15.0  # connecting to ray.address; each call the driver makes to its stats actor
    autoscale_wait_s: float | None = None  # None: the cluster must already fit the run
    in_process_max_chips: int = 64  # a local run with at most this many chips runs without Ray; 0: never

    def __post_init__(self) -> None:
        _check(self.sam_actors >= 1, f"sam_actors={self.sam_actors}: use a positive integer")
        _check(self.in_process_max_chips >= 0,
               f"in_process_max_chips={self.in_process_max_chips}: use a number of chips >= 0 (0: always start Ray)")
        _check(self.sink_tasks is None or self.sink_tasks >= 1,
               f"sink_tasks={self.sink_tasks}: use a positive integer or null")
        _check(self.read_concurrency is None or self.read_concurrency >= 1,
               f"read_concurrency={self.read_concurrency}: use a positive integer, or null to let Ray decide")
        _check(
            self.sam_actors_max is None or self.sam_actors_max >= self.sam_actors,
            f"sam_actors_max={self.sam_actors_max} is below sam_actors={self.sam_actors}",
        )
        for name in ("gpus_per_actor", "read_cpus", "sink_cpus"):
            _check(getattr(self, name) >= 0, f"{name}={getattr(self, name)}: use a value >= 0")
        _check(self.cpus_per_actor is None or self.cpus_per_actor > 0,
               f"cpus_per_actor={self.cpus_per_actor}: use a value > 0, or null for the node's CPUs")
        _check(self.max_task_retries >= 0, f"max_task_retries={self.max_task_retries}: use a value >= 0")
        _check(self.object_store_gb is None or self.object_store_gb >= MIN_OBJECT_STORE_GB,
               f"object_store_gb={self.object_store_gb} is below Ray's minimum object store (75 MiB): "
               f"use at least {MIN_OBJECT_STORE_GB}, or null to let Ray size it")
        _check(self.timeout_s > 0, f"timeout_s={self.timeout_s}: use a number of seconds > 0")
        _check(self.autoscale_wait_s is None or self.autoscale_wait_s >= 0,
               f"autoscale_wait_s={self.autoscale_wait_s}: use seconds >= 0, or null for a cluster that does not grow")

    def resolved(self, node_cpus: float) -> RayConfig:
        """This config with ``cpus_per_actor`` decided for nodes of ``node_cpus`` CPUs.

        Null becomes the node's CPUs less one read's and :data:`BACK_HALF_TASKS_BESIDE_SAM`
        back-half tasks', shared by the actors (on 2 CPUs: 1.25, so ONNX Runtime still runs on
        both cores), and never less than half the node's share per actor.
        """
        if self.cpus_per_actor is not None:
            return self
        share = node_cpus / self.sam_actors
        beside = self.read_cpus + BACK_HALF_TASKS_BESIDE_SAM * self.sink_cpus
        return replace(self, cpus_per_actor=max(share - beside / self.sam_actors, share / 2))

    def back_half_tasks(self, cluster_cpus: float, chips_done: bool = False) -> int:
        """How many back-half tasks run at once: ``sink_tasks``, or when null as many as fit in
        ``cluster_cpus`` beside the SAM actors and one chip read each (at least one). More would
        take the reads' CPUs in Ray's accounting, and the SAM actors would wait for chips
        (2 CPUs: SAM 1.25 + a read 0.25 leave two tasks of 0.25). Once every chip is segmented
        (``chips_done``) no read needs CPUs: one task per CPU
        (:meth:`raysam.scheduler.TaskQueue.chips_done`). Call on a :meth:`resolved` config.
        """
        if self.sink_tasks is not None:
            return self.sink_tasks
        if chips_done or self.sink_cpus == 0:
            return max(1, int(cluster_cpus))
        free = cluster_cpus - self.sam_actors * ((self.cpus_per_actor or 0.0) + self.read_cpus)
        return max(1, int(free / self.sink_cpus + 1e-9))


@dataclass(frozen=True)
class OutputConfig:
    """Where and what to write.

    Attributes:
        root: a local path (``~`` expanded) or an object-store URI (``s3://``, ``gs://``).
        sinks: what to write, at least one of :data:`SINKS`.
        s2_bands: the Sentinel-2 bands the ``s2_raster`` sink writes.
        overwrite: redo date groups whose outputs are complete.
        single_file_max_mpx: grids up to this many megapixels also get single files.
        timeout_s: bound on each object-store request and on reaching the root before a run.
    """

    root: str = "outputs"
    sinks: tuple[str, ...] = SINKS
    s2_bands: tuple[str, ...] = ("B02", "B03", "B04", "B08")
    overwrite: bool = False
    single_file_max_mpx: float = 100.0
    timeout_s: float = 15.0

    def __post_init__(self) -> None:
        _check(self.single_file_max_mpx >= 0,
               f"single_file_max_mpx={self.single_file_max_mpx}: use a value >= 0 (0: tiles only)")
        unknown = sorted(set(self.sinks) - set(SINKS))
        _check(not unknown, f"sinks has unknown sink(s) {unknown}: choose from {list(SINKS)}")
        _check(bool(self.sinks), f"sinks is empty, so the run would write nothing: list at least one of {list(SINKS)}")
        check_band_names("s2_bands", self.s2_bands)
        _check(bool(self.s2_bands) or "s2_raster" not in self.sinks,
               "s2_bands is empty but the s2_raster sink is on: list the bands to write, or drop s2_raster from sinks")
        _check(bool(self.root), "root is empty: give a local path or a URI (s3://bucket/prefix)")
        _check(self.timeout_s > 0, f"timeout_s={self.timeout_s}: use a number of seconds > 0")
        _expand(self, "root")


@dataclass(frozen=True)
class DemoSource:
    """``stac=demo``: where the synthetic catalog is built (then served for the run's duration)."""

    demo_root: str = "demo_data"

    def __post_init__(self) -> None:
        _expand(self, "demo_root")


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
        from raysam.preflight import check_settings

        check_settings(self)


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
    check_known(tree)
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


def setting_paths() -> list[str]:
    """Every setting's YAML path (``sam.points_per_side``, ..., ``dry_run``), in schema order."""
    grouped = [f"{group}.{key}" for group, parts in GROUPS.items() for part in parts for key, _, _ in part.settings()]
    return grouped + [key for key, _, _ in TOP_LEVEL.settings()]


def check_known(tree: Mapping[str, Any]) -> None:
    """Refuse keys that are no setting (a typo added with ``+``, such as ``+dryrun=true``).

    Raises:
        ConfigError: naming each unknown key, with the closest setting if there is one.
    """
    known = set(setting_paths())
    unknown = []
    for key, value in tree.items():
        if key in GROUPS and isinstance(value, Mapping):
            unknown += [f"{key}.{k}" for k in value if f"{key}.{k}" not in known]
        elif key not in known and key not in GROUPS:
            unknown.append(str(key))
    if unknown:
        raise ConfigError(unknown_settings_message(unknown))


def unknown_settings_message(unknown: list[str]) -> str:
    """One line naming keys that are no setting, each with the closest setting if any."""
    paths = setting_paths()
    named = []
    for key in unknown:
        close = difflib.get_close_matches(key, paths, n=1, cutoff=0.6)
        named.append(f"{key} (did you mean {close[0]}?)" if close else key)
    return (f"{', '.join(named)}: no such setting, so it would be ignored (even added with +); "
            "python -m raysam.run region=<name> --cfg job lists every setting")


def redacted(value: Any, secrets: list[str]) -> Any:
    """A deep copy of a plain structure with each secret replaced by ``<redacted>`` where it is a value.

    A value is redacted where it *is* the secret: a ``pc_key`` field, a string equal to a
    secret, a URL query parameter or ``key=value`` override whose value is one, a header whose
    value is one (any mapping entry). The secret is never searched for inside other text, so a
    short or common key cannot damage unrelated values (``region: demo`` stays as it is).
    """
    secrets = [s for s in secrets if s]
    if isinstance(value, dict):
        return {k: REDACTED if k == "pc_key" and v else redacted(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redacted(v, secrets) for v in value)
    if isinstance(value, str):
        return redact_text(value, secrets)
    return value


def redact_text(text: str, secrets: list[str]) -> str:
    """``text`` with a secret replaced where it is the whole value: the text itself, a URL
    query parameter's value, or the value of a ``key=value`` (Hydra override) string."""
    if not secrets:
        return text
    if text in secrets:
        return REDACTED
    if "?" in text:
        base, _, query = text.partition("?")
        pairs = [p.partition("=") for p in query.split("&")]
        return base + "?" + "&".join(k + sep + (REDACTED if unquote(v) in secrets else v) for k, sep, v in pairs)
    key, sep, val = text.partition("=")
    if sep and val in secrets and re.fullmatch(r"[+~]{0,2}[\w.@/-]+", key):
        return f"{key}={REDACTED}"
    return text
