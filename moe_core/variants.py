"""Variants and profiles as data: `variants.yaml` and `profiles/*.yaml`, resolved into a RunConfig.

resolve(variant, profile, seed) = ModelConfig/TrainConfig defaults <- profile <- variant
defaults <- variant, then symbolic values (M, K/3, iso_param, ...) are replaced by numbers.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from functools import lru_cache
from pathlib import Path

import yaml

from .config import (PROFILE_KEYS, VARIANT_KEYS, ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig, build,
                     check_spec, validate)

HERE = Path(__file__).parent
DERIVED = ("iso_flop", "iso_param", "iso_linear")


@lru_cache(maxsize=None)
def _load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def variants() -> dict[str, dict]:
    return {k: v for k, v in _load(HERE / "variants.yaml").items() if not k.startswith("_")}


def profiles() -> dict[str, dict]:
    return {p.stem: _load(p) for p in sorted((HERE / "profiles").glob("*.yaml"))}


def paper_reference() -> dict:
    """The papers' own numbers (moe_core/reference.yaml), never our measurements."""
    return _load(HERE / "reference.yaml")


def check_name(kind: str, name: str, choices) -> None:
    if name not in choices:
        plural = "corpora" if kind == "corpus" else f"{kind}s"
        raise ConfigError(kind, name, f"unknown {kind}; valid {plural}: {', '.join(choices)}")


def _symbol(value, scale: dict, key: str):
    """Replace 'NAME', 'NAME/n' or 'NAME*n' by the profile's scale value; pass anything else."""
    if not isinstance(value, str):
        return value
    match = re.fullmatch(r"([A-Za-z_]+)\s*(?:([/*])\s*(\d+))?", value)
    if not match or match.group(1) not in scale:
        return value  # not a symbol: validation will report it
    base, op, n = scale[match.group(1)], match.group(2), match.group(3)
    if op is None:
        return base
    if op == "*":
        return base * int(n)
    if base % int(n):
        raise ConfigError(key, value, f"{match.group(1)}={base} is not divisible by {n} at this profile")
    return base // int(n)


SECTIONS = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig}


def _section(values: dict, scale: dict, where: str) -> dict:
    """Scale symbols replaced in one section; string fields keep their text (a corpus named "E" stays "E")."""
    text = {name for name, kind in typing.get_type_hints(SECTIONS[where]).items() if kind is str}
    return {k: v if k in text else _symbol(v, scale, f"{where}.{k}") for k, v in values.items()}


def resolve(variant: str, profile: str, seed: int = 42, overrides: dict | None = None) -> RunConfig:
    """The full, validated configuration of one run. `overrides` = {"train": {...}, ...}."""
    check_name("variant", variant, variants())
    check_name("profile", profile, profiles())
    prof, var = profiles()[profile], variants()[variant]
    check_spec(f"profile {profile}", prof, PROFILE_KEYS, required=("scale",))  # a misspelt section is not ignored
    check_spec(f"variant {variant}", var, VARIANT_KEYS)
    defaults = _load(HERE / "variants.yaml")["_defaults"]
    overrides = overrides or {}
    for name in overrides:
        check_name("override section", name, SECTIONS)
    sections = {}
    for name in SECTIONS:
        merged = {**prof.get(name, {}), **defaults.get(name, {}), **var.get(name, {}), **overrides.get(name, {})}
        sections[name] = merged
    scale = {**prof["scale"], "L": prof.get("model", {}).get("n_layers", ModelConfig.n_layers)}
    sections = {name: _section(vals, scale, name) for name, vals in sections.items()}
    hops = var.get("model", {}).get("hops")
    if "hops" not in overrides.get("model", {}) and hops and len(hops) > 1:
        sections["model"]["hops"] = resample_hops(hops, sections["model"].get("n_layers", scale["L"]))
    if "vocab_size" in overrides.get("model", {}):
        raise ConfigError("model.vocab_size", overrides["model"]["vocab_size"], "set data.vocab_size instead")
    data = build(DataConfig, sections["data"], "data")
    model_values = {**sections["model"], "vocab_size": data.vocab_size}
    derived = {k: v for k, v in model_values.items() if v in DERIVED}
    # validate with placeholder widths first, so deriving never runs on a broken config
    model = build(ModelConfig, {**model_values, **{k: 1 for k in derived}}, "model")
    train = build(TrainConfig, sections["train"], "train")
    cfg = validate(RunConfig(model=model, train=train, data=data, seed=seed, variant=variant, profile=profile))
    if derived:  # matched to Wide at the same overrides, less the keys this variant sets itself
        wide = resolve("wide", profile, seed, {**overrides, "model": {
            k: v for k, v in overrides.get("model", {}).items() if k not in var.get("model", {})}}).model
        widths = {key: _derive(what, cfg.model, wide) for key, what in derived.items()}
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **widths))
    return validate(cfg)


def resample_hops(pattern: list[int], n_layers: int) -> list[int]:
    """Map a per-layer hop pattern to another depth: each layer takes the mean of its segment
    of the pattern, rounded half up (8 -> 4 layers: [2,1,2,1,1,4,4,2] -> [2,2,3,3])."""
    out = []
    for layer in range(n_layers):
        lo = layer * len(pattern) // n_layers
        hi = max((layer + 1) * len(pattern) // n_layers, lo + 1)
        segment = pattern[lo:hi]
        out.append(max(1, math.floor(sum(segment) / len(segment) + 0.5)))
    return out


def _derive(what: str, model: ModelConfig, wide: ModelConfig) -> int:
    """An iso-FLOP / iso-parameter width for `model`, matched to the Wide model `wide` (same profile and
    overrides), or the d_space that gives the cosine router a linear router's parameters."""
    from .params import count_parameters

    if what == "iso_flop":
        return wide.active_neurons
    if what == "iso_linear":  # d_space * (d_model + M [+ M kinematic]) = M * d_model
        n_mats = 2 if model.kinematic_vectors else 1
        return round(model.n_experts * model.d_model / (model.d_model + n_mats * model.n_experts))
    wide_total = count_parameters(wide)["total"]
    no_ffn = count_parameters(dataclasses.replace(model, ffn="dense", d_ff=1))["total"] - 2 * model.d_model * model.n_layers
    return round((wide_total - no_ffn) / (2 * model.d_model * model.n_layers))
