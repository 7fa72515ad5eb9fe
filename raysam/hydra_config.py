"""Hydra's side of the configuration: the schema it composes against, and DictConfig -> RunConfig.

:func:`schema` generates the OmegaConf structured config from :data:`raysam.config.GROUPS`
(the fields, types and defaults of the frozen dataclasses that define every setting), so an
unknown key or a value of the wrong type fails while Hydra composes, and no setting is written
twice. It is registered as ``raysam_schema`` (the first entry of ``conf/config.yaml``'s
defaults list) when this module is imported: by the entrypoint (:mod:`raysam.run`) and tests,
never by Ray workers. :func:`to_run_config` validates a composed config into a
:class:`~raysam.config.RunConfig`. Only this module, :mod:`raysam.command_line` (the command
line's checks) and :mod:`raysam.run` import Hydra.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from raysam.config import GROUPS, TOP_LEVEL, Part, RunConfig, from_tree
from raysam.errors import ConfigError

SCHEMA_NAME = "raysam_schema"
_PRIMITIVES = (int, float, str, bool)


def yaml_type(hint: Any, where: str) -> Any:
    """The OmegaConf type of a field: primitives, ``X | None``, lists for tuples, ``Any`` for
    unions of several types.

    Raises:
        TypeError: a type YAML cannot hold (an array, an object): skip that field in its Part.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _PRIMITIVES or hint is Any:
        return hint
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        inner = yaml_type(members[0], where) if len(members) == 1 else Any
        return inner if len(members) == len(args) else typing.Optional[inner]  # OmegaConf 2.3 wants Optional
    if origin in (tuple, list):
        elements = {a for a in args if a is not Ellipsis}
        return list[yaml_type(elements.pop(), where) if len(elements) == 1 else Any]
    raise TypeError(f"{where}: type {hint!r} has no YAML form; skip it in its raysam.config.Part")


def _schema_field(name: str, f: dataclasses.Field, hint: Any, where: str) -> tuple[str, Any, dataclasses.Field]:
    """One structured-config field with the dataclass field's default (``???`` if it has none)."""
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = MISSING
    if isinstance(default, tuple):
        return name, yaml_type(hint, where), dataclasses.field(default_factory=functools.partial(list, default))
    return name, yaml_type(hint, where), dataclasses.field(default=default)


def _schema_fields(parts: tuple[Part, ...]) -> list[tuple[str, Any, dataclasses.Field]]:
    """The structured-config fields of a group's settings."""
    return [_schema_field(key, f, hint, f"{part.cls.__name__}.{f.name}")
            for part in parts for key, f, hint in part.settings()]


@functools.cache
def schema() -> type:
    """The structured config of the whole tree: one dataclass per group, plus the top level."""
    groups = [(group, dataclasses.make_dataclass(f"{group.title()}Schema", _schema_fields(parts)))
              for group, parts in GROUPS.items()]
    return dataclasses.make_dataclass("RunSchema", [
        *((group, cls, dataclasses.field(default_factory=cls)) for group, cls in groups),
        *_schema_fields((TOP_LEVEL,)),
    ])


def register_schema() -> None:
    """Store :func:`schema` as ``raysam_schema`` in Hydra's ConfigStore."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=schema())


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Validate a composed Hydra config and build the typed :class:`~raysam.config.RunConfig`.

    Raises:
        ConfigError: one line naming the missing or bad value and what to use instead.
    """
    try:
        tree = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"config is incomplete or invalid: {str(err).splitlines()[0]}") from None
    return from_tree(tree)


register_schema()
