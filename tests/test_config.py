"""The Hydra config: composition, seed defaults, validation before anything starts, secrets."""

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from raysam.config import REDACTED, GROUPS, RunConfig, redacted
from raysam.errors import ConfigError
from raysam.hydra_config import schema, to_run_config
from raysam.region import RegionSpec
from raysam.run import CONF_DIR, hide_secret_overrides

SEED_DEFAULTS = {  # ../shared/seed/auto_segment_s2.md "Workflow Yaml"
    "spatial_overlap": 0.5, "points_per_side": 16, "n_crop_layers": 0, "crop_overlap_ratio": 0.0,
    "crop_n_points_downscale_factor": 1, "pred_iou_thresh": 0.88, "stability_score_thresh": 0.95,
    "stability_score_offset": 1.0, "points_per_batch": 16, "chip_nms_thr": 0.7, "mask_nms_thr": 0.5,
}


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_seed_defaults_and_model_default():
    cfg = _compose("region=iowa")
    for key, value in SEED_DEFAULTS.items():
        assert cfg.sam[key] == value, key
    run = to_run_config(cfg)
    assert run.model.type == "vit_b"
    assert (run.amg.points_per_side, run.amg.chip_nms_thr, run.merge.mask_nms_thr) == (16, 0.7, 0.5)
    assert run.chip.spatial_overlap == 0.5


@pytest.mark.parametrize("group", ["region=demo", "region=iowa", "model=demo", "model=vit_l", "model=vit_h",
                                   "stac=demo", "ray=cluster"])
def test_every_group_option_composes_and_validates(group):
    overrides = ["region=iowa", group] if not group.startswith("region") else [group]
    run = to_run_config(_compose(*overrides, "stac.url=http://127.0.0.1:1") if "stac=local" in group else _compose(*overrides))
    assert run.region.name


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sam.spatial_overlap=1.0", "sam.spatial_overlap=1.0 is out of range"),
        ("sam.mask_nms_thr=0", "sam.mask_nms_thr=0.0 is out of range"),
        ("sam.pred_iou_thresh=1.5", "pred_iou_thresh"),
        ("sam.points_per_side=0", "points_per_side"),
        ("sam.merge_iou=polygon", "sam.merge_iou='polygon'"),
        ("ray.sam_actors=0", "ray.sam_actors=0"),
        ("output.sinks=[labels]", "unknown sink"),
        ("region.name=../../etc", "is not a safe name"),
        ("device=tpu", "device='tpu'"),
        ("model.type=vit_x", "model.type='vit_x' is unknown"),
    ],
)
def test_bad_values_fail_with_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        to_run_config(_compose("region=iowa", override))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override", ["sam.pointz_per_side=3", "sam.points_per_side=abc", "ray.sam_actors=two"])
def test_typos_and_wrong_types_fail_while_composing(override):
    with pytest.raises(Exception, match="override|merging|Key"):
        _compose("region=iowa", override)


def test_region_is_required():
    with pytest.raises(Exception, match="region"):
        _compose()


def test_secret_override_moves_to_environment(monkeypatch):
    monkeypatch.delenv("PC_SDK_SUBSCRIPTION_KEY", raising=False)
    argv = hide_secret_overrides(["raysam.run", "region=iowa", "stac.pc_key=s3cr3t-key-0123456789abc", "sam.points_per_side=8"])
    assert argv == ["raysam.run", "region=iowa", "sam.points_per_side=8"]
    cfg = _compose(*argv[1:])
    assert "s3cr3t-key-0123456789abc" not in OmegaConf.to_yaml(cfg)  # what --cfg job prints and .hydra/ saves
    run = to_run_config(cfg)
    assert run.stac.pc_key == "s3cr3t-key-0123456789abc"
    assert "s3cr3t-key-0123456789abc" not in repr(run)
    plain = redacted({"stac": {"pc_key": "s3cr3t-key-0123456789abc", "url": "x?key=s3cr3t-key-0123456789abc"}}, ["s3cr3t-key-0123456789abc"])
    assert plain == {"stac": {"pc_key": REDACTED, "url": f"x?key={REDACTED}"}}


def test_conf_dir_is_the_repository_conf():
    assert (Path(CONF_DIR) / "config.yaml").exists()


# ---------------------------------------------------------------- one definition per setting
BARE_REGION = {"name": "bare", "geometry": "0,0,1,1", "time_range": ["2024-06-01", "2024-06-30"]}


def _differences(got, want, path: str = "") -> list[str]:
    """Every field (recursing into nested dataclasses) where two config objects differ."""
    if dataclasses.is_dataclass(want):
        return [d for f in dataclasses.fields(want)
                for d in _differences(getattr(got, f.name), getattr(want, f.name), f"{path}.{f.name}".lstrip("."))]
    return [] if got == want else [f"{path}: conf gives {got!r}, the dataclass default is {want!r}"]


def test_default_options_add_no_default_of_their_own(tmp_path, monkeypatch):
    """conf/config.yaml's default options plus a region file giving only the required keys build
    exactly the dataclasses' defaults, field by field: a default written in conf/*.yaml (or in
    the schema) that disagrees with the dataclass fails here."""
    monkeypatch.delenv("PC_SDK_SUBSCRIPTION_KEY", raising=False)
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "region" / "bare.yaml").write_text(yaml.safe_dump(BARE_REGION))
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        run = to_run_config(compose("config", overrides=["region=bare"]))
    region = RegionSpec(BARE_REGION["name"], BARE_REGION["geometry"], tuple(BARE_REGION["time_range"]))
    assert _differences(run, RunConfig(region=region)) == []


def _option_files() -> list[tuple[str, Path]]:
    """(group, file) of every option that is not its group's default (regions have no default)."""
    defaults = {k: v for entry in yaml.safe_load((Path(CONF_DIR) / "config.yaml").read_text())["defaults"]
                if isinstance(entry, dict) for k, v in entry.items()}
    return [(group, path) for group in GROUPS if group != "region"
            for path in sorted((Path(CONF_DIR) / group).glob("*.yaml")) if path.stem != defaults[group]]


@pytest.mark.parametrize(("group", "path"), _option_files(), ids=lambda v: getattr(v, "stem", v))
def test_other_options_set_only_what_differs_from_the_defaults(group, path):
    """A non-default option that restates a default would keep the old value once the default
    changes: each one sets only what it changes (the rest comes from the schema)."""
    defaults = OmegaConf.structured(schema())[group]
    literal = {k: v for k, v in yaml.safe_load(path.read_text()).items()
               if not (isinstance(v, str) and (v.startswith("${") or v == "???"))}
    assert literal, path
    assert [k for k, v in literal.items() if v == defaults[k]] == []


def test_a_setting_is_named_by_its_yaml_path_in_errors():
    with pytest.raises(ConfigError, match="got network.timeout_s=0.0, network.connect_timeout_s=10.0"):
        to_run_config(_compose("region=iowa", "network.timeout_s=0"))
    with pytest.raises(ConfigError, match=r"^sam.band_scaling needs one value per band"):
        to_run_config(_compose("region=iowa", "sam.band_scaling=[1e-4]"))


def test_coverage_prompts_reach_the_generator_parameters():
    run = to_run_config(_compose("region=iowa"))
    assert run.amg.prompts == "grid"  # the seed-compatible default
    run = to_run_config(_compose("region=iowa", "sam.prompts=coverage", "sam.coverage_min_area_px=900",
                                 "sam.coverage_max_rounds=2", "sam.coverage_max_points=64"))
    assert (run.amg.prompts, run.amg.coverage_min_area_px, run.amg.coverage_max_rounds,
            run.amg.coverage_max_points) == ("coverage", 900, 2, 64)
    with pytest.raises(ConfigError) as err:
        to_run_config(_compose("region=iowa", "sam.prompts=random"))
    assert str(err.value) == "sam.prompts must be one of grid, coverage, got 'random'"


def test_the_key_is_redacted_where_it_is_a_value_and_nowhere_else():
    key = "0123456789abcdef0123456789abcdef"
    tree = {"region": {"name": "demo"}, "stac": {"pc_key": key, "url": f"https://h/api?subscription-key={key}&x=1"},
            "headers": {"Ocp-Apim-Subscription-Key": key}, "overrides": [f"stac.pc_key={key}", "region=demo"],
            "output": {"root": f"/data/{key}-runs"}}
    assert redacted(tree, [key]) == {
        "region": {"name": "demo"}, "stac": {"pc_key": REDACTED, "url": f"https://h/api?subscription-key={REDACTED}&x=1"},
        "headers": {"Ocp-Apim-Subscription-Key": REDACTED}, "overrides": [f"stac.pc_key={REDACTED}", "region=demo"],
        "output": {"root": f"/data/{key}-runs"},  # text that merely contains the key is not a value of it
    }
    # a one-letter "key" used to be cut out of every string ("regi<redacted>n"); by value it matches nothing
    assert redacted({"region": {"name": "demo"}, "root": "outputs"}, ["o"]) == {"region": {"name": "demo"}, "root": "outputs"}


@pytest.mark.parametrize("key", ["o", "abc123", "0123456789 abcdef0123456789abcdef"])
def test_a_key_that_cannot_be_a_planetary_computer_key_is_refused_naming_the_form(key, monkeypatch):
    monkeypatch.setenv("PC_SDK_SUBSCRIPTION_KEY", key)
    with pytest.raises(ConfigError, match="a subscription key is 32 hexadecimal characters") as err:
        to_run_config(_compose("region=iowa"))
    assert len(key) < 3 or key not in str(err.value)  # the message names the form, never the value


def test_paths_expand_the_home_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    run = to_run_config(_compose("region=iowa", "output.root='~/runs'", "model.path='~/models/vit_b'",
                                 "stac=demo", "stac.demo_root='~/demo'"))  # Hydra's grammar wants ~ quoted
    assert run.output.root == str(tmp_path / "runs") and run.model.path == str(tmp_path / "models" / "vit_b")
    assert run.demo_catalog == str(tmp_path / "demo" / "catalog")
    assert to_run_config(_compose("region=iowa", "output.root='s3://bucket/~x'")).output.root == "s3://bucket/~x"
