"""Configuration: variants and profiles resolve, bad values are rejected with clear errors."""
import dataclasses

import pytest

from moe_core.config import CHOICES, ConfigError, ModelConfig, RunConfig, config_hash, recipe, validate
from moe_core.params import count_parameters
from moe_core.variants import profiles, resample_hops, resolve, variants

TABLE3 = ["wide", "deep", "magnitude", "asymmetric", "decoupled", "hash", "random_fixed", "top1", "linear",
          "cosine_iso341", "rank2", "dense_iso_flop", "dense_iso_param", "rank16_wide", "rank16_deep"]
PATHMOE = ["indep", "indep_nolbl", "path_b2", "path_b4", "path_bL", "lowrank"]


def test_every_named_variant_resolves_at_every_profile():
    assert set(TABLE3 + PATHMOE) <= set(variants())
    assert {"tiny", "smoke", "paper"} <= set(profiles())
    for variant in variants():
        for profile in profiles():
            cfg = resolve(variant, profile)
            assert cfg.variant == variant and cfg.profile == profile


def test_small_profile_is_table_1s_36m_scale():
    cfg = resolve("wide", "small")
    m, t = cfg.model, cfg.train
    assert (m.d_model, m.n_heads, m.n_layers, m.n_experts, m.top_k) == (768, 12, 4, 512, 12)
    assert (t.steps, t.tokens_per_step, t.warmup_steps) == (5_000, 16_384, 200)
    assert round(count_parameters(m)["total"] / 1e6, 1) == 37.6  # Table 1: 37.6M
    assert t.steps * t.tokens_per_step == pytest.approx(82e6, rel=0.01)  # Table 1: 82M tokens


def test_paper_profile_is_table_12():
    cfg = resolve("wide", "paper")
    m, t = cfg.model, cfg.train
    assert (m.d_model, m.n_heads, m.n_layers, m.n_experts, m.d_space, m.tau, m.top_k) == (1024, 16, 8, 1024, 64, 30, 12)
    assert (t.batch_size, t.seq_len, t.accum_steps, t.steps, t.tokens_per_step) == (8, 512, 8, 50_000, 32_768)
    assert (t.lr, t.warmup_steps, t.min_lr_ratio, t.weight_decay, t.grad_clip) == (3e-4, 1000, 0.1, 0.01, 1.0)
    assert (t.beta1, t.beta2, t.eps, m.dropout, t.balance_coef) == (0.9, 0.95, 1e-8, 0.1, 0.05)


def test_recipe_of_the_paper_profile_is_the_marathon():
    wide = recipe(resolve("wide", "paper"))
    assert wide["tokens per update"] == 8 * 512 * 8 and wide["tokens seen"] == 1_638_400_000  # the paper's 1.64B
    assert (wide["FFN"], wide["peak lr"], wide["warmup steps"], wide["dropout"]) == ("1024 rank-1, top-12", 3e-4, 1000, 0.1)
    assert recipe(resolve("indep", "smoke"))["FFN"].startswith("16 SwiGLU of width")
    assert recipe(resolve("dense_iso_param", "paper"))["FFN"] == "dense, d_ff 1120"
    assert recipe(resolve("static_deep", "paper"))["FFN"] == "1024 static, top-4, 3 hops"
    assert recipe(resolve("asymmetric", "tiny"))["FFN"].startswith("32 rank-1, top-4, hops per layer ")


def test_smoke_keeps_the_paper_ratios():
    paper, smoke = resolve("wide", "paper").model, resolve("wide", "smoke").model
    assert smoke.d_space / smoke.d_model == paper.d_space / paper.d_model
    assert smoke.n_experts / smoke.d_model == paper.n_experts / paper.d_model
    for variant in ["wide", "deep", "decoupled", "magnitude"]:
        assert resolve(variant, "smoke").model.active_neurons == resolve(variant, "paper").model.active_neurons == 12
    assert resolve("deep", "smoke").model.hops == (3,) and resolve("deep", "smoke").model.top_k == 4


def test_asymmetric_hops_resample_to_other_depths():
    pattern = [2, 1, 2, 1, 1, 4, 4, 2]
    assert resample_hops(pattern, 8) == pattern
    assert resample_hops(pattern, 4) == [2, 2, 3, 3]
    assert resample_hops(pattern, 16) == [h for h in pattern for _ in range(2)]
    assert resolve("asymmetric", "paper").model.hops == tuple(pattern)


def test_config_hash_ignores_labels_and_sees_values():
    a = resolve("wide", "tiny")
    assert config_hash(a) == config_hash(dataclasses.replace(a, variant="x", profile="y"))
    assert config_hash(a) != config_hash(resolve("wide", "tiny", seed=7))
    assert config_hash(a) != config_hash(resolve("deep", "tiny"))
    assert RunConfig.from_dict(a.to_dict()) == a


def test_config_hash_counts_the_device_setting_as_given():
    """With precision auto, `--device cpu` (fp32) and auto (bf16 on a GPU machine) can train different numbers,
    so they are different runs; so are a compiled and an eager one."""
    a = resolve("wide", "tiny")
    hashes = {config_hash(resolve("wide", "tiny", overrides={"train": train})) for train in (
        {}, {"device": "cpu"}, {"device": "cuda"}, {"compile": "on"}, {"compile": "off"})}
    assert len(hashes) == 5 and config_hash(a) in hashes


@pytest.mark.parametrize("overrides,key", [
    ({"train": {"steps": -5}}, "train.steps"),
    ({"train": {"steps": 2.5}}, "train.steps"),
    ({"train": {"stepz": 10}}, "train.stepz"),
    ({"model": {"top_k": 999}}, "model.top_k"),
    ({"model": {"d_space": 10_000}}, "model.d_space"),
    ({"model": {"hops": [0]}}, "model.hops"),
    ({"model": {"hops": [1, 2, 3]}}, "model.hops"),
    ({"model": {"router": "sigmoid"}}, "model.router"),
    ({"model": {"router_block": 3}}, "model.router_block"),
    ({"model": {"dropout": 1.5}}, "model.dropout"),
    ({"model": {"learn_tau": "yes"}}, "model.learn_tau"),
    ({"train": {"lr": 0}}, "train.lr"),
    ({"train": {"balance_tokens": "experts"}}, "train.balance_tokens"),
    ({"data": {"vocab_size": 0}}, "data.vocab_size"),
])
def test_bad_values_are_rejected_with_the_key_and_the_rule(overrides, key):
    with pytest.raises(ConfigError) as err:
        resolve("wide", "tiny", overrides=overrides)
    assert err.value.key == key
    assert key in str(err.value)


def test_bad_names_list_the_valid_choices():
    with pytest.raises(ConfigError, match="valid variants: .*wide.*deep"):
        resolve("wider", "tiny")
    with pytest.raises(ConfigError, match="valid profiles: .*smoke"):
        resolve("wide", "huge")
    with pytest.raises(ConfigError, match="choose one of cosine, linear, hash"):
        resolve("wide", "tiny", overrides={"model": {"router": "sigmoid"}})


def test_non_integer_seed_is_rejected():
    cfg = resolve("wide", "tiny")
    for seed in (-1, 1.5, "42", True):
        with pytest.raises(ConfigError, match="seed"):
            validate(dataclasses.replace(cfg, seed=seed))


def test_router_options_are_checked_against_the_router():
    with pytest.raises(ConfigError, match="only the cosine router"):
        resolve("linear", "tiny", overrides={"model": {"router_per_hop": True}})
    with pytest.raises(ConfigError, match="hash router has no parameters"):
        resolve("hash", "tiny", overrides={"model": {"router_frozen": True}})
    with pytest.raises(ConfigError, match="LowRank-MoE needs router=linear"):
        resolve("wide", "tiny", overrides={"model": {"router_lowrank": 2}})
    with pytest.raises(ConfigError, match="a trained router"):
        resolve("lowrank", "tiny", overrides={"model": {"router_frozen": True}})
    with pytest.raises(ConfigError, match="hash_key='position'.*only the hash router"):
        resolve("wide", "tiny", overrides={"model": {"hash_key": "position"}})
    assert resolve("hash", "tiny", overrides={"model": {"hash_key": "position"}}).model.hash_key == "position"
    with pytest.raises(ConfigError, match="rank experts take"):
        resolve("wide", "tiny", overrides={"model": {"expert_backend": "sorted"}})


def test_every_data_file_of_the_package_is_installed():
    """A non-editable install ships only the package-data globs: each YAML and C++ file the code reads must match one."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["moe_core"]
    package = root / "moe_core"
    data = {p.relative_to(package) for p in package.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")}
    assert data, "no data files found"
    assert {p for p in data if not any(p.match(g) and len(p.parts) == len(Path(g).parts) for g in globs)} == set()


def test_scale_symbols_are_not_substituted_into_text_fields():
    """'E' is a scale symbol (experts per layer), but a corpus named E must be reported as E, not as a number."""
    with pytest.raises(ConfigError, match="invalid data.corpus='E': unknown corpus"):
        resolve("wide", "smoke", overrides={"data": {"corpus": "E"}})
    assert resolve("indep", "smoke").model.n_experts == profiles()["smoke"]["scale"]["E"]  # numbers still are


def test_k_tau_cells_take_a_number_or_learned():
    from moe_core.experiments import k_tau_spec

    assert k_tau_spec(24, 15).overrides["model"] == {"top_k": 24, "tau": 15.0, "learn_tau": False}
    assert k_tau_spec(24, "learned").overrides["model"]["learn_tau"]
    with pytest.raises(ValueError, match="tau='learnt': give a number or 'learned'"):
        k_tau_spec(12, "learnt")


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_every_string_option_names_its_choices_when_misspelt(name):
    section = "model" if name in {f.name for f in dataclasses.fields(ModelConfig)} else "train"
    with pytest.raises(ConfigError) as err:
        resolve("wide", "tiny", overrides={section: {name: "nonsense"}})
    assert str(err.value) == f"invalid {section}.{name}='nonsense': choose one of {', '.join(CHOICES[name])}"
