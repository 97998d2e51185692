"""A study spec (YAML) and its cells: every run of a scaling study, fully resolved.

A spec names a base ``megapatch train`` recipe, overrides for it, model sizes, token or FLOP
budgets, methods (token level; patch level with lists of K and λ) and seeds, and the grids
that combine them::

    base: ../../examples/tiny_cpu.yaml     # a megapatch train recipe, relative to this file
    overrides: {data: {data_path: [data/embedded_all_spm4000]}, training: {eval_samples: 128}}
    sizes:
      S: {num_layers: 2, hidden_size: 64, num_attention_heads: 2}
      L: {params: 3e6, layout: {tensor_model_parallel_size: 2, gpus_per_node: 2}}
    grids:
      - sizes: [S, L]
        budgets: [{tokens: 1048576}, {flops: 2e13}]
        methods: [token, {patch: {K: [2, 4], lam: ["1/2", "2/3"]}}]
        seeds: [1234]

A cell is one (size, budget, method, K, λ, seed) of a grid; grids may overlap (a cell is
planned once). Each cell is resolved to a full :class:`~megapatch.config.RunConfig` in this
order: base recipe, ``overrides``, the size's model fields and its own ``overrides``, the
budget (``training.train_tokens``), the method (``stages``), the seed (``data.seed``), the
layout (``parallel``). It is then validated with ``validate_config(cfg, world, runtime=False)``.

Rules (documented in the README):

* **Size from a parameter target** (``params: N``, non-embedding parameters): depth L runs over
  1..64 with ``hidden = aspect_ratio * L`` rounded to a multiple of ``head_dim`` (at least one
  head), ``heads = hidden / head_dim``, ``ffn = ffn_ratio * hidden`` rounded up to a multiple of
  ``head_dim``, plain multi-head attention; the L whose non-embedding parameter count is closest
  to N in log scale wins (the smaller on a tie). ``size_rule`` sets aspect_ratio (32), head_dim
  (32) and ffn_ratio (8/3).
* **FLOP budget** (``flops: C``): the number of optimizer steps whose planned training FLOPs
  (``flops_per_step`` over the cell's stage plan) are closest to C; the cell's token budget is
  those steps times B·T. A patch cell therefore gets more tokens than a token cell at the same C.
* **Run id**: a readable prefix ``n{layers}L{hidden}h-d{tokens}|c{flops}-{method}-s{seed}`` and
  10 hex digits of the SHA-256 of the cell's resolved config, restricted to the fields that can
  change what is trained (everything but the run directory, the layout, checkpointing, logging,
  data-loader workers and caches, the micro-batch size, recompute and exit settings) and to the
  values that differ from megapatch's defaults (so a new config field with a default does not
  rename old cells). The same cell gets the same id in any study directory and on any re-plan.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from megapatch.config import ConfigError, ModelConfig, RunConfig, config_from_dict, load_yaml


class StudyError(ValueError):
    """A bad study spec, manifest, run directory or results table: the message names the entry
    (file + key, cell id, or CSV file + line + column) and the fix. Exit code 2."""


TOP_KEYS = (
    "name",
    "description",
    "base",
    "overrides",
    "size_rule",
    "layout",
    "sizes",
    "grids",
    "allow_repeated_data",
    "slurm",
)
SIZE_RULE_KEYS = ("aspect_ratio", "head_dim", "ffn_ratio")
LAYOUT_KEYS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size",
    "sequence_parallel",
    "nodes",
    "gpus_per_node",
)
SIZE_KEYS = ("params", "layout", "overrides")
GRID_KEYS = ("name", "sizes", "budgets", "methods", "seeds")
PATCH_KEYS = ("K", "lam", "patch_context")
SLURM_KEYS = (
    "partition",
    "account",
    "time",
    "cpus_per_task",
    "gpus",
    "signal",
    "container",
    "sbatch_args",
)
SLURM_DEFAULTS: dict[str, Any] = dict(
    partition=None,
    account=None,
    time="04:00:00",
    cpus_per_task=None,
    gpus=True,
    signal="B:USR1@300",
    container=None,
    sbatch_args=[],
)

# Fields that cannot change what a run trains (left out of the run id's hash).
OPERATIONAL_FIELDS = {
    "run_dir": None,
    "parallel": None,
    "checkpoint": None,
    "logging": None,
    "data": ("num_workers", "data_cache_path"),
    "training": (
        "micro_batch_size",
        "log_interval",
        "exit_duration_in_mins",
        "exit_interval",
        "exit_signal_handler",
        "recompute_granularity",
        "recompute_method",
        "recompute_num_layers",
    ),
}

# What makes the shared held-out set (checked equal across all cells of a study).
HELDOUT_FIELDS = (
    ("data", "data_path"),
    ("data", "split"),
    ("data", "seq_length"),
    ("data", "eod_mask_loss"),
    ("training", "eval_samples"),
)


@dataclass
class Layout:
    """Where a cell runs: model-parallel sizes and the machines (world = nodes x gpus_per_node)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False
    nodes: int = 1
    gpus_per_node: int = 1

    @property
    def world_size(self) -> int:
        """Ranks of the run."""
        return self.nodes * self.gpus_per_node

    def parallel_section(self) -> dict[str, Any]:
        """The ``parallel`` section of the cell's config."""
        return {k: getattr(self, k) for k in LAYOUT_KEYS[:4]}


@dataclass
class Method:
    """Token-level training (K=1) or patch-level training with K, λ and the patch context."""

    name: str  # "token" or "patch"
    K: int = 1
    lam: float = 0.0
    patch_context: str = "KT"

    def tag(self) -> str:
        """The method's part of the run id."""
        if self.name == "token":
            return "token"
        ctx = "" if self.patch_context == "KT" else f"-ctx{self.patch_context}"
        return f"patch-k{self.K}-l{self.lam:.2g}{ctx}"


@dataclass
class Budget:
    """A token budget, or a FLOP budget resolved to tokens per cell."""

    tokens: int | None = None
    flops: float | None = None

    def tag(self, tokens: int) -> str:
        """The budget's part of the run id: ``d256K`` (tokens) or ``c1.5e13`` (FLOPs)."""
        if self.flops is not None:
            mant, exp = f"{self.flops:.2e}".split("e")
            return f"c{float(mant):g}e{int(exp)}"
        return f"d{short_count(tokens)}"


def short_count(n: int) -> str:
    """1048576 -> '1M', 1572864 -> '1.5M', 262144 -> '256K'; other counts as digits."""
    for unit, div in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= div and (n * 10) % div == 0:
            return f"{n / div:g}{unit}"
    return str(n)


@dataclass
class Cell:
    """One run of the study, fully resolved and planned."""

    run_id: str
    size: str
    budget: Budget
    method: Method
    seed: int
    layout: Layout
    config: RunConfig
    plan: list  # list[StagePlan]
    flops: float
    params: int
    params_non_embedding: int
    origin: str  # "grids[0]: size S, budgets[1], methods[0] K=4 lam=0.667, seed 1"

    @property
    def tokens(self) -> int:
        """Planned training tokens."""
        return sum(s.tokens for s in self.plan)

    def stage_tokens(self) -> dict[str, int]:
        """Planned tokens per stage name."""
        return {s.name: s.tokens for s in self.plan}

    def heldout(self) -> dict[str, Any]:
        """The fields that define the shared held-out set."""
        return heldout_key(self.config)


@dataclass
class Spec:
    """A parsed study spec (paths resolved, every key checked)."""

    path: str
    name: str
    base: str
    overrides: dict
    size_rule: dict
    layout: dict
    sizes: dict  # name -> {"model": {...}, "layout": {...}, "overrides": {...}, "params": n}
    grids: list  # [{"name", "sizes", "budgets", "methods", "seeds"}]
    allow_repeated_data: bool = False
    slurm: dict = field(default_factory=lambda: dict(SLURM_DEFAULTS))


# ---------------------------------------------------------------------------- parsing


def _check_keys(value: Any, where: str, known: tuple[str, ...], kind: str = "a mapping") -> dict:
    if not isinstance(value, dict):
        raise StudyError(f"{where}: must be {kind}, got {type(value).__name__}")
    unknown = [k for k in value if k not in known]
    if unknown:
        raise StudyError(
            f"{where}: unknown key '{unknown[0]}' (known: {', '.join(known)}); fix the spec"
        )
    return value


def _number(value: Any, where: str, *, integer: bool = False, positive: bool = True) -> Any:
    """An int/float from YAML (also '1e6', '2/3' strings)."""
    x: Any = value
    if isinstance(value, str):
        try:
            x = float(Fraction(value.strip())) if "/" in value else float(value)
        except (ValueError, ZeroDivisionError):
            raise StudyError(f"{where}: '{value}' is not a number") from None
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise StudyError(f"{where}: {value!r} is not a finite number")
    if integer:
        if float(x) != int(x):
            raise StudyError(f"{where}: {value!r} must be a whole number")
        x = int(x)
    if positive and x <= 0:
        raise StudyError(f"{where}: {value!r} must be > 0")
    return x


def _list(value: Any, where: str) -> list:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise StudyError(f"{where}: is empty, so the grid has no cells; give at least one entry")
    return items


def load_spec(path: str) -> Spec:
    """Read and check a study spec; raises :class:`StudyError` naming the file and key."""
    import yaml

    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise StudyError(f"{path}: no such study spec") from None
    except yaml.YAMLError as err:
        raise StudyError(f"{path}: not valid YAML ({err})") from None
    raw = _check_keys(raw if raw is not None else {}, path, TOP_KEYS)
    for key in ("base", "sizes", "grids"):
        if key not in raw:
            raise StudyError(f"{path}: missing key '{key}' (a study needs base, sizes and grids)")
    if not isinstance(raw["base"], str):
        raise StudyError(f"{path}: base must be the path of a megapatch train recipe")
    base = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), raw["base"]))
    if not os.path.isfile(base):
        raise StudyError(f"{path}: base {raw['base']} not found (looked for {base})")
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise StudyError(f"{path}: overrides must map recipe sections to field: value")
    rule = dict(aspect_ratio=32, head_dim=32, ffn_ratio=8 / 3)
    for key, value in _check_keys(
        raw.get("size_rule") or {}, f"{path}: size_rule", SIZE_RULE_KEYS
    ).items():
        rule[key] = _number(value, f"{path}: size_rule.{key}", integer=key == "head_dim")
    layout = _layout(raw.get("layout") or {}, f"{path}: layout")
    sizes_raw = raw["sizes"]
    if not isinstance(sizes_raw, dict) or not sizes_raw:
        raise StudyError(f"{path}: sizes must map size names to model shapes (and is empty)")
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    sizes = {}
    for name, body in sizes_raw.items():
        where = f"{path}: sizes.{name}"
        if not isinstance(body, dict) or not body:
            raise StudyError(f"{where}: give model fields (num_layers, hidden_size, ...) or params")
        known = tuple(sorted(model_fields)) + SIZE_KEYS
        _check_keys(body, where, known)
        model = {k: v for k, v in body.items() if k in model_fields}
        size = dict(
            model=model,
            layout=_layout(body.get("layout") or {}, f"{where}.layout", base=layout),
            overrides=body.get("overrides") or {},
            params=None,
        )
        if "params" in body:
            size["params"] = _number(body["params"], f"{where}.params")
            shape_keys = {"num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size"}
            if shape_keys & set(model):
                raise StudyError(
                    f"{where}: give either params (resolved by size_rule) or the shape "
                    f"({', '.join(sorted(shape_keys & set(model)))}), not both"
                )
        sizes[str(name)] = size
    grids_raw = raw["grids"]
    if not isinstance(grids_raw, list) or not grids_raw:
        raise StudyError(f"{path}: grids must be a non-empty list; the study has no cells")
    grids = [_grid(g, f"{path}: grids[{i}]", sizes) for i, g in enumerate(grids_raw)]
    slurm = dict(SLURM_DEFAULTS)
    slurm.update(_check_keys(raw.get("slurm") or {}, f"{path}: slurm", SLURM_KEYS))
    if not isinstance(slurm["sbatch_args"], list):
        raise StudyError(f"{path}: slurm.sbatch_args must be a list of sbatch options")
    allow = raw.get("allow_repeated_data", False)
    if not isinstance(allow, bool):
        raise StudyError(f"{path}: allow_repeated_data must be true or false")
    name = raw.get("name") or os.path.basename(os.path.dirname(os.path.abspath(path)))
    return Spec(path, str(name), base, overrides, rule, layout, sizes, grids, allow, slurm)


def _layout(raw: Any, where: str, base: dict | None = None) -> dict:
    out = dict(base or dataclasses.asdict(Layout()))
    for key, value in _check_keys(raw, where, LAYOUT_KEYS).items():
        if key == "sequence_parallel":
            if not isinstance(value, bool):
                raise StudyError(f"{where}.{key}: must be true or false")
            out[key] = value
        elif key == "virtual_pipeline_model_parallel_size" and value is None:
            out[key] = None
        else:
            out[key] = _number(value, f"{where}.{key}", integer=True)
    return out


def _grid(raw: Any, where: str, sizes: dict) -> dict:
    _check_keys(raw, where, GRID_KEYS)
    for key in ("sizes", "budgets", "methods"):
        if key not in raw:
            raise StudyError(f"{where}: missing key '{key}' (a grid needs sizes, budgets, methods)")
    names = _list(raw["sizes"], f"{where}.sizes")
    for i, n in enumerate(names):
        if str(n) not in sizes:
            raise StudyError(
                f"{where}.sizes[{i}]: unknown size '{n}' (defined: {', '.join(sizes)})"
            )
    budgets = []
    for i, b in enumerate(_list(raw["budgets"], f"{where}.budgets")):
        w = f"{where}.budgets[{i}]"
        if not isinstance(b, dict):
            b = {"tokens": b}
        _check_keys(b, w, ("tokens", "flops"))
        if len(b) != 1:
            raise StudyError(f"{w}: give exactly one of tokens or flops")
        if "tokens" in b:
            budgets.append(Budget(tokens=_number(b["tokens"], f"{w}.tokens", integer=True)))
        else:
            budgets.append(Budget(flops=float(_number(b["flops"], f"{w}.flops"))))
    methods: list[tuple[int, Method]] = []
    for i, m in enumerate(_list(raw["methods"], f"{where}.methods")):
        w = f"{where}.methods[{i}]"
        if m == "token" or m == {"token": None} or m == {"token": {}}:
            methods.append((i, Method("token")))
            continue
        if not (isinstance(m, dict) and list(m) == ["patch"]):
            raise StudyError(f"{w}: a method is 'token' or {{patch: {{K: [...], lam: [...]}}}}")
        body = _check_keys(m["patch"] or {}, f"{w}.patch", PATCH_KEYS)
        for key in ("K", "lam"):
            if key not in body:
                raise StudyError(f"{w}.patch: missing key '{key}'")
        ks = [_number(k, f"{w}.patch.K", integer=True) for k in _list(body["K"], f"{w}.patch.K")]
        lams = [_number(x, f"{w}.patch.lam") for x in _list(body["lam"], f"{w}.patch.lam")]
        ctxs = _list(body.get("patch_context", "KT"), f"{w}.patch.patch_context")
        for c in ctxs:
            if c not in ("KT", "T"):
                raise StudyError(f"{w}.patch.patch_context: '{c}' must be KT or T")
        for k in ks:
            if k < 2:
                raise StudyError(f"{w}.patch.K: {k} must be >= 2 (K=1 is the token method)")
        for x in lams:
            if not 0 < x <= 1:
                raise StudyError(f"{w}.patch.lam: {x} must lie in (0, 1]")
        methods += [(i, Method("patch", k, x, c)) for k in ks for x in lams for c in ctxs]
    seeds = None
    if "seeds" in raw:
        seeds = [
            _number(s, f"{where}.seeds", integer=True, positive=False)
            for s in _list(raw["seeds"], f"{where}.seeds")
        ]
    return dict(
        name=raw.get("name"),
        sizes=[str(n) for n in names],
        budgets=budgets,
        methods=methods,
        seeds=seeds,
    )


# ---------------------------------------------------------------------------- model sizes


def count_parameters(model: ModelConfig) -> tuple[int, int]:
    """(total, non-embedding) parameters of ``model`` with the unpadded vocabulary.

    Non-embedding leaves out the input embedding (and a learned position table) and the output
    layer. Counted per layer as megatron-core builds it: input norm, QKV, attention output
    projection (optional QK norms), pre-MLP norm, MLP (two input projections with SwiGLU), plus
    the final norm.
    """
    h, heads = model.hidden_size, model.num_attention_heads
    groups = model.num_query_groups or heads
    d = model.kv_channels or h // heads
    ffn = model.resolved_ffn_hidden_size()
    bias = model.add_bias_linear
    norm = 2 * h if model.normalization == "LayerNorm" else h
    qkv_out = heads * d + 2 * groups * d
    layer = norm + h * qkv_out + heads * d * h + norm
    layer += (qkv_out + h) if bias else 0
    if model.qk_layernorm:
        layer += 2 * (2 * d if model.normalization == "LayerNorm" else d)
    fc1 = 2 * ffn if model.swiglu else ffn
    layer += h * fc1 + ffn * h + ((fc1 + h) if bias else 0)
    non_embedding = model.num_layers * layer + norm
    embedding = model.vocab_size * h
    if model.position_embedding_type == "learned_absolute":
        embedding += model.max_position_embeddings * h
    output = model.vocab_size * h if model.untie_embeddings_and_output_weights else 0
    return non_embedding + embedding + output, non_embedding


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def shape_for_params(target: float, rule: dict, base: ModelConfig) -> dict[str, Any]:
    """Model fields whose non-embedding parameter count is closest to ``target`` (log scale)."""
    best = None
    hd = int(rule["head_dim"])
    for layers in range(1, 65):
        hidden = _round_to(rule["aspect_ratio"] * layers, hd)
        shape = dict(
            num_layers=layers,
            hidden_size=hidden,
            num_attention_heads=hidden // hd,
            num_query_groups=None,
            kv_channels=None,
            ffn_hidden_size=hd * math.ceil(rule["ffn_ratio"] * hidden / hd),
        )
        _, n = count_parameters(dataclasses.replace(base, **shape))
        err = abs(math.log(n / target))
        if best is None or err < best[0] - 1e-12:
            best = (err, shape, n)
    err, shape, n = best
    if shape["num_layers"] in (1, 64) and err > math.log(2):
        raise StudyError(
            f"{target:,.0f} non-embedding parameters is outside what size_rule {rule} covers "
            f"with depths 1..64 (closest: {n:,} at depth {shape['num_layers']}); change params "
            "or size_rule"
        )
    return shape


# ---------------------------------------------------------------------------- cells


def _merge(into: dict, over: dict, where: str) -> dict:
    out = copy.deepcopy(into)
    for key, value in over.items():
        if key == "run_dir":
            continue
        if not isinstance(value, dict):
            raise StudyError(f"{where}: section '{key}' must be a mapping of field: value")
        if key not in out or not isinstance(out[key], dict):
            out[key] = {}  # unknown sections are refused by config_from_dict below
        out[key].update(value)
    return out


def _config(raw: dict, where: str) -> RunConfig:
    try:
        return config_from_dict(raw, source=where)
    except ConfigError as err:
        raise StudyError(str(err)) from None
    except TypeError as err:  # a field given a value of the wrong shape
        raise StudyError(f"{where}: {err}") from None


def hashed_fields(cfg: RunConfig) -> dict[str, Any]:
    """The config values that identify a run: non-default values of non-operational fields."""
    have, default = cfg.to_dict(), RunConfig().to_dict()
    out: dict[str, Any] = {}
    for section, values in have.items():
        skip = OPERATIONAL_FIELDS.get(section, ())
        if section in OPERATIONAL_FIELDS and skip is None:
            continue
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if key in skip or value == default[section].get(key, object()):
                continue
            out[f"{section}.{key}"] = value
    return out


def config_hash(cfg: RunConfig) -> str:
    """10 hex digits identifying what ``cfg`` trains (see the module docstring)."""
    text = json.dumps(hashed_fields(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def heldout_key(cfg: RunConfig | dict[str, Any]) -> dict[str, Any]:
    """Fields that define the held-out set every cell is validated on (of a config or of its
    dict, e.g. a run directory's config.yaml written by another megapatch version)."""
    d = cfg.to_dict() if isinstance(cfg, RunConfig) else cfg
    return {f"{s}.{k}": (d.get(s) or {}).get(k) for s, k in HELDOUT_FIELDS}


def plan_flops(cfg: RunConfig, plan: list) -> float:
    """Training FLOPs of a planned run: megapatch's one FLOP function over its stages."""
    from megapatch.training.flops import flops_per_step

    vocab = cfg.model.padded_vocab_size(cfg.parallel.tensor_model_parallel_size)
    return float(
        sum(flops_per_step(cfg.model, s.global_batch, s.positions, vocab) * s.steps for s in plan)
    )


def _plan(cfg: RunConfig, world: int, what: str) -> list:
    from megapatch.training.validate import validate_config

    try:
        return validate_config(cfg, world, runtime=False)
    except ConfigError as err:
        raise StudyError(f"{what}: {err}") from None


def _tokens_for_flops(cfg: RunConfig, world: int, target: float, what: str) -> int:
    from megapatch.config import ConfigError as CE
    from megapatch.training.plan import make_plan

    per_step = cfg.training.global_batch_size * cfg.data.seq_length

    def flops(steps: int) -> float:
        c = dataclasses.replace(cfg)
        c.training = dataclasses.replace(cfg.training, train_tokens=steps * per_step)
        try:
            return plan_flops(c, make_plan(c, world))
        except CE as err:
            raise StudyError(f"{what}: {err}") from None

    probe = 1000
    guess = max(1, round(target / (flops(probe) / probe)))
    steps = min(range(max(1, guess - 3), guess + 4), key=lambda s: abs(flops(s) - target))
    return steps * per_step


def expand(spec: Spec) -> list[Cell]:
    """Every cell of ``spec`` in spec order (grids, sizes, budgets, methods, seeds)."""
    base = load_yaml(spec.base).to_dict()
    common = _merge(base, spec.overrides, f"{spec.path}: overrides")
    common_cfg = _config(common, f"{spec.path}: overrides")
    default_seeds = [common_cfg.data.seed]
    cells: dict[str, Cell] = {}
    for gi, grid in enumerate(spec.grids):
        for size_name in grid["sizes"]:
            size = spec.sizes[size_name]
            where = f"{spec.path}: sizes.{size_name}"
            raw = _merge(common, size["overrides"], f"{where}.overrides")
            model = dict(raw.get("model") or {})
            if size["params"] is not None:
                model_cfg = _config(raw, where).model
                model.update(shape_for_params(size["params"], spec.size_rule, model_cfg))
            model.update(size["model"])
            raw["model"] = model
            layout = Layout(**size["layout"])
            raw["parallel"] = dict(raw.get("parallel") or {}, **layout.parallel_section())
            for bi, budget in enumerate(grid["budgets"]):
                for mi, method in grid["methods"]:
                    for seed in grid["seeds"] or default_seeds:
                        cell_raw = copy.deepcopy(raw)
                        cell_raw.setdefault("stages", {}).update(
                            patch_size=method.K,
                            patch_fraction=method.lam,
                            **({"patch_context": method.patch_context} if method.K > 1 else {}),
                        )
                        cell_raw.setdefault("data", {})["seed"] = seed
                        desc = (
                            f"grids[{gi}] size {size_name}, budgets[{bi}], methods[{mi}] "
                            f"({method.tag()}), seed {seed}"
                        )
                        cell = _resolve(
                            spec, cell_raw, size_name, budget, method, seed, layout, desc
                        )
                        cells.setdefault(cell.run_id, cell)
    return list(cells.values())


def _resolve(
    spec: Spec,
    raw: dict,
    size: str,
    budget: Budget,
    method: Method,
    seed: int,
    layout: Layout,
    desc: str,
) -> Cell:
    cfg = _config(raw, f"{spec.path}: {desc}")
    world = layout.world_size
    if budget.flops is not None:
        tokens = _tokens_for_flops(cfg, world, budget.flops, f"{spec.path}: {desc}")
    else:
        tokens = budget.tokens
    cfg.training = dataclasses.replace(cfg.training, train_tokens=tokens)
    m = cfg.model
    prefix = f"n{m.num_layers}L{m.hidden_size}h-{budget.tag(tokens)}-{method.tag()}-s{seed}"
    run_id = f"{prefix}-{config_hash(cfg)}"
    plan = _plan(cfg, world, f"{spec.path}: cell {run_id} ({desc})")
    total, non_emb = count_parameters(m)
    return Cell(
        run_id=run_id,
        size=size,
        budget=budget,
        method=method,
        seed=seed,
        layout=layout,
        config=cfg,
        plan=plan,
        flops=plan_flops(cfg, plan),
        params=total,
        params_non_embedding=non_emb,
        origin=desc,
    )
