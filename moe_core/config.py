"""Run configuration: four frozen dataclasses (model, train, data, and the run that holds them), their
validation, and the hash that names a run.

One resolved `RunConfig` is the single source of truth of a run: everything that can change a
result is a field here, so `config_hash` can name the run directory. Validation happens before
any work and raises `ConfigError` naming the key, the bad value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

CHOICES: dict[str, tuple[str, ...]] = {
    "ffn": ("moe", "dense"),
    "expert": ("rank", "swiglu", "static"),
    "router": ("cosine", "linear", "hash", "recurrent"),
    "hash_key": ("token", "position"),
    "residual": ("accum", "literal"),
    "magnitude_scope": ("global", "layer"),
    "expert_backend": ("auto", "gather", "masked", "grouped", "sorted", "loop"),
    "balance_tokens": ("tokens_k", "tokens"),
    "balance_events": ("per_hop", "per_layer"),
    "balance_reduce": ("mean", "sum"),
    "precision": ("auto", "fp32", "bf16"),
    "device": ("auto", "cpu", "cuda"),
    "compile": ("auto", "on", "off"),
    "micro_batches": ("sequential", "fused"),
}


class ConfigError(ValueError):
    """A configuration value is unknown, ill-typed or out of range."""

    def __init__(self, key: str, value: Any, allowed: str):
        super().__init__(f"invalid {key}={value!r}: {allowed}")
        self.key, self.value, self.allowed = key, value, allowed


@dataclass(frozen=True)
class ModelConfig:
    """The transformer and its FFN. Defaults are the paper's Marathon Wide 1x12 layer settings."""

    vocab_size: int = 32000
    d_model: int = 1024
    n_heads: int = 16
    n_layers: int = 8
    max_seq_len: int = 1024  # RoPE capacity (the paper lists 1024 while training on 512-token windows)
    dropout: float = 0.1  # embeddings, attention probabilities, attention and FFN (or MoE) outputs; none inside experts
    attn_bias: bool = True  # Q/K/V/O biases; needed for the paper's parameter counts
    rope_theta: float = 10000.0
    ffn: str = "moe"  # "moe" or "dense"
    d_ff: int = 0  # dense FFN width (iso-FLOP 12, iso-parameter 1120 at paper scale)
    # --- MoE experts
    expert: str = "rank"  # "rank": rank-r SiLU experts (ST-MoE); "swiglu": FFN experts (PathMoE);
    # "static": the paper's original V_sem experts, one fixed vector each (Table 17)
    n_experts: int = 1024
    expert_rank: int = 1
    expert_d_ff: int = 0  # hidden width of a SwiGLU expert
    expert_backend: str = "auto"  # fast path (rank: gather/masked, swiglu: grouped/sorted/masked) or "loop" reference
    # --- routing
    router: str = "cosine"  # "cosine" (ST-MoE, X-MoE-like), "linear" (standard gate), "hash", "recurrent"
    top_k: int = 12
    hops: tuple[int, ...] = (1,)  # hop count per layer; one value applies to every layer
    d_space: int = 64
    tau: float = 30.0
    learn_tau: bool = False
    router_frozen: bool = False  # random-fixed (cosine) / Rand-MoE (linear): router never trains
    router_per_hop: bool = False  # decoupled routing: one proj_in per hop
    router_block: int = 1  # consecutive layers sharing one router (PathMoE B; 1 = independent)
    router_decision_block: int = 1  # MonoB: consecutive layers reusing the first one's (idx, weights) (1 = off)
    router_lowrank: int = 0  # LowRank-MoE rank r: W_l = W_base + A_l B_l (0 = off)
    router_hidden: int = 128  # Recurrent-MoE: GRU state size carried across layers
    kinematic_vectors: bool = False  # allocate the paper's unused M x d_space navigation vectors
    hash_key: str = "token"  # what the hash router hashes: token id (Roller et al.) or position
    renormalize: bool = True  # renormalise the top-k probabilities to sum to one
    magnitude_alpha: float = 0.0  # Magnitude Hack: init of a learnable output scalar (0 = off)
    magnitude_scope: str = "global"  # one alpha for the model, or one per layer
    residual: str = "accum"  # "accum": block adds h_accum; "literal": block adds x + h_accum

    def hops_per_layer(self) -> tuple[int, ...]:
        return self.hops * self.n_layers if len(self.hops) == 1 else self.hops

    @property
    def active_neurons(self) -> int:
        """Active FFN neurons per token per layer (H*K*r for MoE, d_ff for dense), layer mean."""
        if self.ffn == "dense":
            return self.d_ff
        width = {"rank": self.expert_rank, "swiglu": self.expert_d_ff, "static": 0}[self.expert]
        return round(sum(self.hops_per_layer()) / self.n_layers * self.top_k * width)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, evaluation and the balance loss. Defaults are the paper's Table 12 recipe."""

    steps: int = 50_000
    batch_size: int = 8  # sequences per micro-batch
    seq_len: int = 512
    accum_steps: int = 8
    # "fused": the accum_steps micro-batches of a step run as one batch, the balance loss still taken
    # per micro-batch, so the objective is the same; one large step is much faster on a large GPU
    micro_batches: str = "sequential"
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of lr
    warmup_steps: int = 1000
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    balance_coef: float = 0.05  # Switch balance loss weight (PathMoE Indep-MoE: 0.01)
    balance_tokens: str = "tokens_k"  # f_i = selections / (tokens*k) or / tokens
    balance_events: str = "per_hop"  # one loss per (layer, hop) routing event, or per layer
    balance_reduce: str = "mean"  # average or sum over routing events
    z_loss_coef: float = 0.0  # router z-loss weight (off in both papers)
    eval_every: int = 2500
    eval_batches: int = 50  # fixed sequential validation batches (the bootstrap's units)
    eval_batch_size: int = 8
    checkpoint_every: int = 2500
    telemetry_seqs: int = 8  # validation sequences whose routing is recorded
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"
    compile: str = "auto"  # torch.compile the training step: auto = on for CUDA, off on CPU (no gain there)
    threads: int = 0  # CPU threads a run trains with (0 = torch's default); results depend on it, so it is
    # part of the config, and a grid of runs on a CPU trains cores // threads runs at once

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.accum_steps


@dataclass(frozen=True)
class DataConfig:
    corpus: str = "wiki-vital"
    vocab_size: int = 32000


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run depends on. `variant`/`profile` are labels, not hashed."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 42
    variant: str = "custom"
    profile: str = "custom"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return cls(
            model=build(ModelConfig, d["model"], "model"),
            train=build(TrainConfig, d["train"], "train"),
            data=build(DataConfig, d["data"], "data"),
            seed=d["seed"],
            variant=d.get("variant", "custom"),
            profile=d.get("profile", "custom"),
        )


def build(cls, values: dict, where: str):
    """Instantiate a config dataclass from a dict, rejecting unknown keys and wrong types."""
    known = {f.name: f for f in fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"{where}.{key}", values[key], f"unknown key; valid keys: {', '.join(known)}")
    clean = {}
    for key, value in values.items():
        default = getattr(cls(), key)
        clean[key] = _coerce(f"{where}.{key}", value, default)
    return cls(**clean)


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check `value` against the type of the field's default (ints may stand for floats)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(key, value, "must be true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "must be an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, value, "must be a number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(key, value, "must be a string")
        return value
    if isinstance(default, tuple):
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(key, value, "must be an integer or a list of integers")
        return tuple(value)
    raise TypeError(f"no coercion rule for {key}")  # a programming error, not a user error


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def _typed_fields(cfg: RunConfig):
    """(key, value) of every field, after checking that each has its default's type."""
    for section in ("model", "train", "data"):
        obj = getattr(cfg, section)
        for f in fields(obj):
            key, value = f"{section}.{f.name}", getattr(obj, f.name)
            _coerce(key, value, f.default)
            yield key, value


def validate(cfg: RunConfig) -> RunConfig:
    """Reject impossible or inconsistent settings before any work starts."""
    from .data import CORPORA  # imported here: data imports the store, which imports this module

    m, t, d = cfg.model, cfg.train, cfg.data
    values = dict(_typed_fields(cfg))
    _require(isinstance(cfg.seed, int) and not isinstance(cfg.seed, bool) and 0 <= cfg.seed < 2**63,
             "seed", cfg.seed, "must be an integer in [0, 2**63)")
    _require(d.corpus in CORPORA, "data.corpus", d.corpus, f"unknown corpus; valid corpora: {', '.join(CORPORA)}")
    _require(d.vocab_size >= 257, "data.vocab_size", d.vocab_size, "must be >= 257 (256 bytes + end-of-text)")
    for section, obj in (("model", m), ("train", t)):
        for name, choices in CHOICES.items():
            if hasattr(obj, name):
                value = getattr(obj, name)
                _require(value in choices, f"{section}.{name}", value, f"choose one of {', '.join(choices)}")
    positive = {
        "model.vocab_size": m.vocab_size, "model.d_model": m.d_model, "model.n_heads": m.n_heads,
        "model.n_layers": m.n_layers, "model.max_seq_len": m.max_seq_len,
        "train.steps": t.steps, "train.batch_size": t.batch_size, "train.seq_len": t.seq_len,
        "train.accum_steps": t.accum_steps, "train.eval_every": t.eval_every,
        "train.eval_batches": t.eval_batches, "train.eval_batch_size": t.eval_batch_size,
        "train.checkpoint_every": t.checkpoint_every,
    }
    for key, value in positive.items():
        _require(value >= 1, key, value, "must be >= 1")
    for key, value in values.items():
        if isinstance(value, int) and not isinstance(value, bool):
            _require(value >= 0, key, value, "must be >= 0")
        if isinstance(value, float):
            _require(math.isfinite(value), key, value, "must be a finite number")
    _require(m.d_model % m.n_heads == 0, "model.n_heads", m.n_heads, f"must divide d_model={m.d_model}")
    _require((m.d_model // m.n_heads) % 2 == 0, "model.n_heads", m.n_heads,
             "head dimension d_model/n_heads must be even (RoPE rotates pairs)")
    _require(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "must be in [0, 1)")
    _require(t.seq_len <= m.max_seq_len, "train.seq_len", t.seq_len, f"must be <= model.max_seq_len={m.max_seq_len}")
    _require(m.vocab_size == d.vocab_size, "model.vocab_size", m.vocab_size,
             f"must equal data.vocab_size={d.vocab_size}")
    _require(t.lr > 0, "train.lr", t.lr, "must be > 0")
    _require(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
    for key in ("weight_decay", "grad_clip", "balance_coef", "z_loss_coef"):
        _require(getattr(t, key) >= 0, f"train.{key}", getattr(t, key), "must be >= 0")
    for key in ("beta1", "beta2"):
        _require(0.0 <= getattr(t, key) < 1.0, f"train.{key}", getattr(t, key), "must be in [0, 1)")
    _require(t.eps > 0, "train.eps", t.eps, "must be > 0")
    _require(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "must be > 0")
    if m.ffn == "dense":
        _require(m.d_ff >= 1, "model.d_ff", m.d_ff, "a dense FFN needs d_ff >= 1")
        return cfg
    _require(m.n_experts >= 1, "model.n_experts", m.n_experts, "must be >= 1")
    _require(1 <= m.top_k <= m.n_experts, "model.top_k", m.top_k, f"must be in [1, n_experts={m.n_experts}]")
    hops = m.hops
    _require(len(hops) in (1, m.n_layers), "model.hops", list(hops),
             f"give one hop count or one per layer ({m.n_layers})")
    _require(all(h >= 1 for h in hops), "model.hops", list(hops), "every hop count must be >= 1")
    if m.expert == "rank":
        _require(m.expert_rank >= 1, "model.expert_rank", m.expert_rank, "must be >= 1")
        _require(m.expert_backend not in ("grouped", "sorted"), "model.expert_backend", m.expert_backend,
                 "rank experts take auto, gather, masked or loop")
    elif m.expert == "static":
        _require(m.expert_backend in ("auto", "loop"), "model.expert_backend", m.expert_backend,
                 "static experts take auto or loop")
    else:
        _require(m.expert_d_ff >= 1, "model.expert_d_ff", m.expert_d_ff, "SwiGLU experts need expert_d_ff >= 1")
        _require(m.expert_backend in ("auto", "grouped", "sorted", "masked", "loop"), "model.expert_backend",
                 m.expert_backend, "SwiGLU experts take auto, grouped, sorted, masked or loop")
    _require(1 <= m.router_block <= m.n_layers and m.n_layers % m.router_block == 0, "model.router_block",
             m.router_block, f"must divide n_layers={m.n_layers}")
    divisors = [b for b in range(1, m.n_layers + 1) if m.n_layers % b == 0]
    _require(m.router_decision_block in divisors, "model.router_decision_block", m.router_decision_block,
             f"must divide n_layers={m.n_layers}; choose one of {', '.join(map(str, divisors))}")
    _require(m.router_decision_block == 1 or set(hops) == {1}, "model.router_decision_block", m.router_decision_block,
             "decision forcing reuses one decision per layer, so it needs hops=1")
    if m.router == "cosine":
        _require(1 <= m.d_space <= m.d_model, "model.d_space", m.d_space, f"must be in [1, d_model={m.d_model}]")
        _require(m.tau > 0, "model.tau", m.tau, "must be > 0")
    else:
        for key in ("router_per_hop", "learn_tau", "kinematic_vectors"):
            _require(not getattr(m, key), f"model.{key}", True, "only the cosine router has this option")
    if m.router == "hash":
        _require(not m.router_frozen and m.router_block == 1 and m.router_lowrank == 0, "model.router", "hash",
                 "the hash router has no parameters to freeze, share or factorise")
    if m.router == "recurrent":
        _require(m.router_block == 1 and not m.router_frozen, "model.router", "recurrent",
                 "the recurrent router is one GRU across all layers: no block sharing or freezing")
        _require(m.router_hidden >= 1, "model.router_hidden", m.router_hidden, "must be >= 1")
    if m.router_lowrank:
        _require(m.router == "linear" and m.router_block == 1 and not m.router_frozen, "model.router_lowrank",
                 m.router_lowrank, "LowRank-MoE needs router=linear, router_block=1 and a trained router")
    _require(m.hash_key == "token" or m.router == "hash", "model.hash_key", m.hash_key,
             "only the hash router reads it; set router=hash or leave hash_key=token")
    return cfg


PROFILE_KEYS = ("description", "scale", "model", "train", "data")
VARIANT_KEYS = ("description", "model", "train", "data")


def check_spec(where: str, spec: Any, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> None:
    """Reject a profile or variant entry (YAML) with unknown or missing keys or ill-typed sections.

    The keys inside `model`/`train`/`data` are checked by `build` when the entry is resolved.
    """
    _require(isinstance(spec, dict), where, spec, f"must be a mapping with keys among {', '.join(allowed)}")
    for key, value in spec.items():
        _require(key in allowed, f"{where}.{key}", value, f"unknown key; valid keys: {', '.join(allowed)}")
        if key == "description":
            _require(isinstance(value, str), f"{where}.{key}", value, "must be a string")
        else:
            _require(isinstance(value, dict), f"{where}.{key}", value, "must be a mapping")
    for key in required:
        _require(key in spec, f"{where}.{key}", None, "is required")
    for name, value in spec.get("scale", {}).items():
        _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"{where}.scale.{name}",
                 value, "must be an integer >= 1")


def config_hash(cfg: RunConfig, extra: dict | None = None) -> str:
    """A short stable hash of everything that changes results (labels excluded). train.device and train.compile
    count as given, not as resolved: with precision auto a CUDA run is bf16 and a CPU run fp32, so `--device cpu`
    names another run than auto, which on a GPU machine trains in bf16."""
    d = cfg.to_dict()
    d.pop("variant"), d.pop("profile")
    if extra:
        d["_extra"] = extra
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def recipe(cfg: RunConfig) -> dict[str, Any]:
    """The settings a reader compares between profiles (shape, data, optimisation), by readable name:
    the rows of the recipe table in the book."""
    m, t = cfg.model, cfg.train
    tokens_per_update = t.batch_size * t.seq_len * t.accum_steps
    kind = {"rank": f"rank-{m.expert_rank}", "swiglu": f"SwiGLU of width {m.expert_d_ff}", "static": "static"}[m.expert]
    hops = list(m.hops_per_layer())
    trajectory = ("" if set(hops) == {1} else f", {hops[0]} hops" if len(set(hops)) == 1
                  else f", hops per layer {'-'.join(map(str, hops))}")
    experts = f"{m.n_experts} {kind}, top-{m.top_k}{trajectory}"
    return {"d_model": m.d_model, "heads": m.n_heads, "layers": m.n_layers,
            "FFN": experts if m.ffn == "moe" else f"dense, d_ff {m.d_ff}",
            "router": "none" if m.ffn != "moe" else f"cosine, d_space {m.d_space}" if m.router == "cosine" else m.router,
            "corpus": cfg.data.corpus, "vocabulary": cfg.data.vocab_size,
            "context (tokens)": t.seq_len, "tokens per update": tokens_per_update, "steps": t.steps,
            "tokens seen": tokens_per_update * t.steps, "peak lr": t.lr, "warmup steps": t.warmup_steps,
            "weight decay": t.weight_decay, "dropout": m.dropout, "balance loss weight": t.balance_coef}
