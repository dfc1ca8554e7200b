"""Recipes: TOML → frozen, validated dataclasses.

A recipe names the model, the output, the calibration data, the default scheme and ordered
rules that override it by module name (first match wins), and run options. Keys are split in
two: *semantic* keys change the output bytes and are hashed into the resume check; *run* keys
(device, batch size, paths) may change between a run and its resumption.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import StreamqError

# Schemes streamq can write, and whether this build implements them yet. A named scheme that is
# not implemented is an error at load time, never a silent fallback.
KNOWN_SCHEMES = ("FLOAT", "W8A8", "W8A8_DYNAMIC", "W8A8_MIX", "W8A16", "W4A16", "W4A8_DYNAMIC", "W8A8S")
UNIMPLEMENTED_SCHEMES: tuple[str, ...] = ()
GROUPED_SCHEMES = ("W4A16", "W4A8_DYNAMIC")  # the schemes group_size applies to
W_METHODS = ("minmax", "gptq", "hqq", "ssz")

# msModelSlim's (w_bit, a_bit, is_dynamic) words → scheme, for users who write QuantConfig terms.
MSMODELSLIM_SCHEMES = {
    (8, 8, True): "W8A8_DYNAMIC",
    (8, 8, False): "W8A8",
    (8, 16, False): "W8A16",
    (8, 16, True): "W8A16",
    (4, 16, False): "W4A16",
    (4, 16, True): "W4A16",
    (4, 8, True): "W4A8_DYNAMIC",
}
# With is_lowbit = true, msModelSlim reads w_bit = 4, a_bit = 8 (static) as its low-bit sparse
# quantization, whose output is typed W8A8S.
LOWBIT_SCHEMES = {(4, 8, False): "W8A8S"}

# msModelSlim options that streamq knows but does not implement yet: accepted only at their
# neutral value so that a recipe asking for them fails loudly instead of being ignored.
NEUTRAL_OPTIONS = {
    "nonuniform": False,
}
# msModelSlim's sparse-quantization words: is_lowbit picks W8A8S, the others shape its weight fit.
SPARSE_KEYS = ("is_lowbit", "co_sparse", "open_outlier", "use_sigma", "sigma_factor", "fraction")
# msModelSlim's smoothing subgraph types (`enable_subgraph_type`), in its order of application.
SUBGRAPH_TYPES = ("up-down", "ov", "norm-linear", "linear-linear")


@dataclass(frozen=True)
class Outliers:
    """Which weights of a W8A8S row keep the int8 range (the rest lie on a 4-bit grid)."""
    open_outlier: bool = True    # false: no outliers, every weight on the 4-bit grid
    use_sigma: bool = False      # true: |W − mean| > sigma_factor·std of the row; false: top `fraction` by |W|
    sigma_factor: float = 3.0    # msModelSlim's range [3, 4]
    fraction: float = 0.01       # msModelSlim's range [0.01, 0.1]


@dataclass(frozen=True)
class QuantArgs:
    """How one linear is quantized."""
    scheme: str = "W8A8_DYNAMIC"
    group_size: int = 0          # 0 = per channel
    w_method: str = "minmax"
    w_sym: bool = True
    percdamp: float = 0.01       # GPTQ damping, relative to mean(diag H)
    act_order: bool = True       # GPTQ: columns by decreasing diag(H), static group mapping (free in
                                 # the stored format; measured better at every group size)
    outliers: Outliers = Outliers()  # W8A8S only


@dataclass(frozen=True)
class Rule:
    match: str                   # glob on the module name, or "re:<regex>"; {mtp} = the MTP layer index
    args: QuantArgs

    def matches(self, module: str, mtp_index: int | None = None) -> bool:
        pattern = self.match
        if "{mtp}" in pattern:
            if mtp_index is None:
                return False
            pattern = pattern.replace("{mtp}", str(mtp_index))
        if pattern.startswith("re:"):
            return re.fullmatch(pattern[3:], module) is not None
        return fnmatch.fnmatchcase(module, pattern)


@dataclass(frozen=True)
class Calibration:
    source: str = "builtin"      # "builtin" or a .jsonl / .json / .txt path
    text_field: str = "text"
    samples: int = 32
    seq_len: int = 256
    seed: int = 0


@dataclass(frozen=True)
class Run:
    device: str = "auto"
    batch_size: int = 8
    compute_dtype: str = "float32"
    propagate: str = "quantized"  # next layer sees the quantized ("quantized") or float output
    expert_budget_gb: float = 8.0  # routed experts read per chunk (host memory; read ahead as a unit)
    read_ahead: bool = True        # read the next layer / expert chunk while this one computes
    write_behind_gb: float = 0.5   # output bytes queued for the writer thread (0: write in line)


@dataclass(frozen=True)
class Recipe:
    model: str = ""
    output: str = ""
    shard_size_gb: float = 4.0
    mtp: str = "quantize"        # the MTP layer: quantize by the rules, keep "float", or "drop" it
    anti_method: str = ""        # anti-outlier smoothing: "" (none), "m1" SmoothQuant, "m4" iter-smooth, "m6" flex
    alpha: float | None = None   # smoothing strength (default 0.5 for m1, 0.9 for m4; m6 searches it)
    anti_symmetric: bool = True  # m4 / m6: false shifts by the channel midpoint (adds norm biases)
    enable_subgraph_type: tuple[str, ...] = SUBGRAPH_TYPES  # which subgraphs smoothing rescales
    disable_level: int = 0       # msModelSlim "L<n>": the n linears with the most outlying inputs stay FLOAT
    act_method: int = 1          # static activation range: 1 min-max, 2 histogram (MSE), 3 auto-mix
    act_aggregate: str = "global"  # min-max over batches: "global" extremes or "mean" of per-batch
    use_kvcache_quant: bool = False  # KV cache C8 (dense attention): per-channel K/V scale and offset
    config_extra: dict = field(default_factory=dict)  # keys added to the output config.json
    default: QuantArgs = QuantArgs()
    rules: tuple[Rule, ...] = ()
    disable_names: tuple[str, ...] = ()
    disable_last_linear: bool = True
    calibration: Calibration = Calibration()
    run: Run = Run()
    source_text: str = field(default="", compare=False, repr=False)

    def args_for(self, module: str, is_last_linear: bool = False, mtp_index: int | None = None) -> QuantArgs:
        """The quantization of one linear: disable words first, then the first matching rule."""
        if module in self.disable_names or (is_last_linear and self.disable_last_linear):
            return dataclasses.replace(self.default, scheme="FLOAT")
        for rule in self.rules:
            if rule.matches(module, mtp_index):
                return rule.args
        return self.default

    def semantic(self) -> dict:
        """Everything that changes the output bytes (what resume compares), keyed as in the TOML."""
        return {
            "model": {"mtp": self.mtp},
            "output": {"shard_size_gb": self.shard_size_gb, "config": dict(self.config_extra)},
            "quant": {
                **dataclasses.asdict(self.default),
                "rules": [{"match": r.match, **dataclasses.asdict(r.args)} for r in self.rules],
                "disable_names": list(self.disable_names),
                "disable_last_linear": self.disable_last_linear,
                "anti_method": self.anti_method, "alpha": self.alpha, "anti_symmetric": self.anti_symmetric,
                "enable_subgraph_type": list(self.enable_subgraph_type),
                "act_method": self.act_method, "act_aggregate": self.act_aggregate,
                "use_kvcache_quant": self.use_kvcache_quant, "disable_level": self.disable_level,
            },
            "calibration": dataclasses.asdict(self.calibration),
            "run": {"compute_dtype": self.run.compute_dtype, "propagate": self.run.propagate},
        }

    def make_range(self):
        """The activation-range observer of a static input, as act_method says."""
        from .observers import make_observer
        return make_observer(self.act_method, self.act_aggregate)

    def semantic_hash(self) -> str:
        blob = json.dumps(self.semantic(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


# --- parsing ---------------------------------------------------------------------------------

TABLE_KEYS = {
    "": {"model", "output", "calibration", "quant", "run"},
    "model": {"path", "mtp"},
    "output": {"path", "shard_size_gb", "config"},
    "calibration": {"source", "text_field", "samples", "seq_len", "seed"},
    "run": {"device", "batch_size", "compute_dtype", "propagate", "expert_budget_gb", "read_ahead",
            "write_behind_gb"},
}
ARG_KEYS = {"scheme", "group_size", "w_method", "w_sym", "w_bit", "a_bit", "is_dynamic", "percdamp", "act_order"}
QUANT_KEYS = ARG_KEYS | {"rules", "disable_names", "disable_last_linear", "anti_method", "do_smooth", "alpha",
                         "anti_symmetric", "enable_subgraph_type", "act_method", "act_aggregate",
                         "use_kvcache_quant", "disable_level"} | set(NEUTRAL_OPTIONS) | set(SPARSE_KEYS)
ANTI_METHODS = ("", "m1", "m4", "m6")
DISABLE_LEVEL = re.compile(r"L(\d{1,6})")
RULE_KEYS = ARG_KEYS | {"match"}


def _check_keys(table: dict, allowed: set[str], where: str, path: Path) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys here: {', '.join(sorted(allowed))}"
            raise StreamqError(f"{path}: unknown recipe key '{where}{key}'", hint)


def _typed(value, kind, key: str, path: Path):
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise StreamqError(f"{path}: recipe key '{key}' must be {kind.__name__}, got {value!r}",
                           "fix the value in the recipe")
    return value


def _parse_args(table: dict, base: QuantArgs, where: str, path: Path) -> QuantArgs:
    scheme = table.get("scheme")
    if scheme is None and {"w_bit", "a_bit"} & table.keys():
        bits = (table.get("w_bit", 8), table.get("a_bit", 8), table.get("is_dynamic", False))
        words = LOWBIT_SCHEMES if table.get("is_lowbit") is True else MSMODELSLIM_SCHEMES
        scheme = words.get(bits)
        if scheme is None:
            raise StreamqError(f"{path}: no scheme for w_bit={bits[0]}, a_bit={bits[1]}, is_dynamic={bits[2]} in {where}"
                               + (" with is_lowbit = true (msModelSlim's low-bit precision tuning of other schemes "
                                  "is not implemented)" if words is LOWBIT_SCHEMES else ""),
                               f"supported combinations: {sorted(words)}")
    scheme = _typed(scheme if scheme is not None else base.scheme, str, where + "scheme", path).upper()
    if scheme not in KNOWN_SCHEMES:
        close = difflib.get_close_matches(scheme, KNOWN_SCHEMES, n=1)
        raise StreamqError(f"{path}: unknown scheme '{scheme}' in {where}scheme",
                           f"did you mean '{close[0]}'?" if close else f"one of {', '.join(KNOWN_SCHEMES)}")
    if scheme in UNIMPLEMENTED_SCHEMES:
        raise StreamqError(f"{path}: scheme {scheme} in {where}scheme is not implemented in this version",
                           "choose W8A8, W8A8_DYNAMIC, W8A8_MIX, W8A16, W4A16 or W4A8_DYNAMIC")
    w_method = _typed(table.get("w_method", base.w_method), str, where + "w_method", path).lower()
    if w_method not in W_METHODS:
        raise StreamqError(f"{path}: unknown w_method '{w_method}' in {where}", "use MinMax, GPTQ, HQQ or ssz")
    # A rule inherits the default's keys, except those that do not apply to its own scheme.
    inherited_group = base.group_size if scheme in GROUPED_SCHEMES else 0
    group_size = _typed(table.get("group_size", inherited_group), int, where + "group_size", path)
    if group_size < 0:
        raise StreamqError(f"{path}: {where}group_size must be >= 0 (0 = per channel)", "fix the value")
    w_sym = _typed(table.get("w_sym", base.w_sym if scheme == "W4A16" else True), bool, where + "w_sym", path)
    if not w_sym and scheme not in ("W4A16", "FLOAT"):
        # Consumers ignore weight offsets for every other scheme (FORMAT.md §3).
        raise StreamqError(f"{path}: w_sym = false in {where} applies only to W4A16; {scheme} weights are symmetric",
                           "remove w_sym or set it to true for this scheme")
    percdamp = _typed(table.get("percdamp", base.percdamp), float, where + "percdamp", path)
    if not 0 < percdamp < 1:
        raise StreamqError(f"{path}: {where}percdamp must be in (0, 1), got {percdamp}", "0.01 is the usual value")
    act_order = _typed(table.get("act_order", base.act_order), bool, where + "act_order", path)
    return QuantArgs(scheme=scheme, group_size=group_size, w_method=w_method, w_sym=w_sym, percdamp=percdamp,
                     act_order=act_order, outliers=base.outliers)


def _check_neutral(quant: dict, path: Path) -> None:
    for key, neutral in NEUTRAL_OPTIONS.items():
        if key in quant and quant[key] != neutral:
            raise StreamqError(f"{path}: quant.{key} = {quant[key]!r} is not implemented in this version",
                               f"remove the key or set it to {neutral!r}")


def _parse_outliers(quant: dict, path: Path) -> Outliers:
    """The W8A8S outlier words, typed and within msModelSlim's documented ranges. A word that
    would have no effect beside the others is an error, unless it sits at its default value."""
    d = Outliers()
    o = Outliers(open_outlier=_typed(quant.get("open_outlier", d.open_outlier), bool, "quant.open_outlier", path),
                 use_sigma=_typed(quant.get("use_sigma", d.use_sigma), bool, "quant.use_sigma", path),
                 sigma_factor=_typed(quant.get("sigma_factor", d.sigma_factor), float, "quant.sigma_factor", path),
                 fraction=_typed(quant.get("fraction", d.fraction), float, "quant.fraction", path))
    if not 3 <= o.sigma_factor <= 4:
        raise StreamqError(f"{path}: quant.sigma_factor must be in [3, 4], got {o.sigma_factor}",
                           "3 (msModelSlim's default) protects more weights than 4")
    if not 0.01 <= o.fraction <= 0.1:
        raise StreamqError(f"{path}: quant.fraction must be in [0.01, 0.1], got {o.fraction}",
                           "the share of each row's weights kept as outliers; 0.01 is msModelSlim's default")
    idle = {"sigma_factor": not o.use_sigma or not o.open_outlier, "fraction": o.use_sigma or not o.open_outlier,
            "use_sigma": not o.open_outlier}
    for key, unused in idle.items():
        if unused and getattr(o, key) != getattr(d, key):
            raise StreamqError(f"{path}: quant.{key} = {json.dumps(quant[key])} has no effect with open_outlier = "
                               f"{str(o.open_outlier).lower()}, use_sigma = {str(o.use_sigma).lower()}",
                               "outliers are chosen by use_sigma + sigma_factor or by fraction, and only when "
                               "open_outlier = true; remove the key")
    return o


def _check_sparse_words(quant: dict, schemes: list[str], path: Path) -> None:
    """is_lowbit, co_sparse and the outlier words apply to W8A8S only; schemes[0] is the default's."""
    lowbit = _typed(quant.get("is_lowbit", False), bool, "quant.is_lowbit", path)
    if lowbit and schemes[0] != "W8A8S":
        raise StreamqError(f"{path}: quant.is_lowbit = true with scheme {schemes[0]}: msModelSlim's low-bit precision "
                           "tuning is not implemented in this version",
                           "is_lowbit = true with w_bit = 4, a_bit = 8 is sparse quantization (W8A8S); else remove it")
    if _typed(quant.get("co_sparse", False), bool, "quant.co_sparse", path) and "W8A8S" not in schemes:
        raise StreamqError(f"{path}: quant.co_sparse = true: the co_sparse mode is not implemented in this version",
                           'use scheme = "W8A8S" (msModelSlim prefers its low-bit sparse mode, which W8A8S is, '
                           "over co_sparse)")
    d = Outliers()
    for key in ("open_outlier", "use_sigma", "sigma_factor", "fraction"):
        if key in quant and quant[key] != getattr(d, key) and "W8A8S" not in schemes:
            raise StreamqError(f"{path}: quant.{key} = {json.dumps(quant[key])} shapes the weights of W8A8S "
                               "linears, and no linear uses W8A8S",
                               'set scheme = "W8A8S" (or is_lowbit = true with w_bit = 4, a_bit = 8), or remove the key')


def parse_recipe(text: str, path: Path) -> Recipe:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise StreamqError(f"{path}: not valid TOML: {exc}", "fix the syntax of the recipe file") from exc
    _check_keys(doc, TABLE_KEYS[""], "", path)
    for name in ("model", "output", "calibration", "run"):
        _check_keys(doc.get(name, {}), TABLE_KEYS[name], name + ".", path)
    quant = doc.get("quant", {})
    _check_keys(quant, QUANT_KEYS, "quant.", path)
    _check_neutral(quant, path)
    default = _parse_args(quant, QuantArgs(outliers=_parse_outliers(quant, path)), "quant.", path)
    rules = []
    for i, table in enumerate(quant.get("rules", [])):
        where = f"quant.rules[{i}]."
        _check_keys(table, RULE_KEYS, where, path)
        if "match" not in table:
            raise StreamqError(f"{path}: {where} has no 'match'", "add match = \"<glob on module names>\"")
        match = _typed(table["match"], str, where + "match", path)
        if match.startswith("re:"):
            try:
                re.compile(match[3:])
            except re.error as exc:
                raise StreamqError(f"{path}: {where}match is not a valid regex: {exc}", "fix the pattern") from exc
        rules.append(Rule(match, _parse_args(table, default, where, path)))
    _check_sparse_words(quant, [default.scheme] + [r.args.scheme for r in rules], path)
    cal, run, out = doc.get("calibration", {}), doc.get("run", {}), doc.get("output", {})
    calibration = Calibration(
        source=_typed(cal.get("source", "builtin"), str, "calibration.source", path),
        text_field=_typed(cal.get("text_field", "text"), str, "calibration.text_field", path),
        samples=_typed(cal.get("samples", 32), int, "calibration.samples", path),
        seq_len=_typed(cal.get("seq_len", 256), int, "calibration.seq_len", path),
        seed=_typed(cal.get("seed", 0), int, "calibration.seed", path),
    )
    if calibration.samples < 1 or calibration.seq_len < 2:
        raise StreamqError(f"{path}: calibration.samples must be >= 1 and seq_len >= 2", "fix the values")
    runopts = Run(
        device=_typed(run.get("device", "auto"), str, "run.device", path),
        batch_size=_typed(run.get("batch_size", 8), int, "run.batch_size", path),
        compute_dtype=_typed(run.get("compute_dtype", "float32"), str, "run.compute_dtype", path),
        propagate=_typed(run.get("propagate", "quantized"), str, "run.propagate", path),
        expert_budget_gb=_typed(run.get("expert_budget_gb", 8.0), float, "run.expert_budget_gb", path),
        read_ahead=_typed(run.get("read_ahead", True), bool, "run.read_ahead", path),
        write_behind_gb=_typed(run.get("write_behind_gb", 0.5), float, "run.write_behind_gb", path),
    )
    _check_choice(runopts.compute_dtype, ("float32", "bfloat16", "float16"), "run.compute_dtype", path)
    _check_choice(runopts.propagate, ("quantized", "float"), "run.propagate", path)
    if runopts.batch_size < 1:
        raise StreamqError(f"{path}: run.batch_size must be >= 1", "fix the value")
    if not 0 <= runopts.write_behind_gb < float("inf"):
        raise StreamqError(f"{path}: run.write_behind_gb must be a finite number >= 0, got {runopts.write_behind_gb}",
                           "0.5 is the default; 0 writes each tensor before the next is computed")
    shard = _typed(out.get("shard_size_gb", 4.0), float, "output.shard_size_gb", path)
    if shard <= 0:
        raise StreamqError(f"{path}: output.shard_size_gb must be > 0", "fix the value")
    names = quant.get("disable_names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise StreamqError(f"{path}: quant.disable_names must be a list of module names", "fix the value")
    anti = _parse_anti(quant, path)
    mtp = _typed(doc.get("model", {}).get("mtp", "quantize"), str, "model.mtp", path)
    _check_choice(mtp, ("quantize", "float", "drop"), "model.mtp", path)
    extra = out.get("config", {})
    if not isinstance(extra, dict):
        raise StreamqError(f"{path}: output.config must be a table of keys for config.json", "fix the value")
    return Recipe(
        model=_typed(doc.get("model", {}).get("path", ""), str, "model.path", path),
        mtp=mtp,
        config_extra=extra,
        **anti,
        output=_typed(out.get("path", ""), str, "output.path", path),
        shard_size_gb=shard,
        default=default,
        rules=tuple(rules),
        disable_names=tuple(names),
        disable_last_linear=_typed(quant.get("disable_last_linear", True), bool, "quant.disable_last_linear", path),
        calibration=calibration,
        run=runopts,
        source_text=text,
    )


def _parse_anti(quant: dict, path: Path) -> dict:
    """Activation-side options: anti_method (msModelSlim's words; do_smooth = true alone means
    SmoothQuant, m1) and the static-range observer (act_method, act_aggregate)."""
    do_smooth = _typed(quant.get("do_smooth", False), bool, "quant.do_smooth", path)
    method = _typed(quant.get("anti_method", "m1" if do_smooth else ""), str, "quant.anti_method", path).lower()
    _check_choice(method, ANTI_METHODS, "quant.anti_method", path)
    alpha = quant.get("alpha")
    if alpha is not None and method == "m6":
        raise StreamqError(f"{path}: quant.alpha does not apply to anti_method = \"m6\", which searches α and β "
                           "per subgraph", "remove quant.alpha")
    if alpha is not None:
        alpha = _typed(alpha, float, "quant.alpha", path)
        if not 0 <= alpha <= 1:
            raise StreamqError(f"{path}: quant.alpha must be in [0, 1], got {alpha}", "0.5 is SmoothQuant's default")
    symmetric = _typed(quant.get("anti_symmetric", True), bool, "quant.anti_symmetric", path)
    if not symmetric and method not in ("m4", "m6"):
        raise StreamqError(f"{path}: anti_symmetric = false needs anti_method = \"m4\" or \"m6\"",
                           "the shifted (asymmetric) smoothing is a variant of iter-smooth and flex-smooth")
    subgraphs = _parse_subgraphs(quant, method, path)
    act_method = _typed(quant.get("act_method", 1), int, "quant.act_method", path)
    if act_method not in (1, 2, 3):
        raise StreamqError(f"{path}: quant.act_method = {act_method} is not 1, 2 or 3",
                           "1 min-max, 2 histogram, 3 auto-mix")
    aggregate = _typed(quant.get("act_aggregate", "global"), str, "quant.act_aggregate", path)
    _check_choice(aggregate, ("global", "mean"), "quant.act_aggregate", path)
    kv = _typed(quant.get("use_kvcache_quant", False), bool, "quant.use_kvcache_quant", path)
    return {"anti_method": method, "alpha": alpha, "anti_symmetric": symmetric, "enable_subgraph_type": subgraphs,
            "act_method": act_method,
            "act_aggregate": aggregate, "use_kvcache_quant": kv, "disable_level": _parse_level(quant, path)}


def _parse_subgraphs(quant: dict, method: str, path: Path) -> tuple[str, ...]:
    """enable_subgraph_type: a non-empty list of SUBGRAPH_TYPES (any order, kept in the order of
    application, so that two spellings of one choice hash alike); only with anti_method."""
    if "enable_subgraph_type" not in quant:
        return SUBGRAPH_TYPES
    value, key = quant["enable_subgraph_type"], "quant.enable_subgraph_type"
    valid = ", ".join(f'"{t}"' for t in SUBGRAPH_TYPES)
    if not method:
        raise StreamqError(f"{path}: {key} selects what smoothing rescales, and anti_method is not set",
                           'set anti_method (e.g. "m4") or remove the key')
    if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
        raise StreamqError(f"{path}: {key} must be a non-empty list of subgraph types, got {json.dumps(value)}",
                           f"choose from {valid}; to smooth nothing, remove anti_method")
    for t in value:
        if t not in SUBGRAPH_TYPES:
            close = difflib.get_close_matches(t, SUBGRAPH_TYPES, n=1)
            raise StreamqError(f"{path}: {key} has unknown subgraph type {t!r}",
                               (f"did you mean '{close[0]}'? " if close else "") + f"valid values: {valid}")
    return tuple(t for t in SUBGRAPH_TYPES if t in value)


def _parse_level(quant: dict, path: Path) -> int:
    """msModelSlim's disable_level: "L<n>" (n ≥ 0); "" and "L0" mean none."""
    word = _typed(quant.get("disable_level", ""), str, "quant.disable_level", path)
    m = DISABLE_LEVEL.fullmatch(word)
    if word and m is None:
        raise StreamqError(f"{path}: quant.disable_level = {word!r} is not \"L<n>\"",
                           "write for example \"L4\" to keep the 4 linears with the most outlying inputs FLOAT")
    return int(m.group(1)) if m else 0


def _check_choice(value: str, choices: tuple[str, ...], key: str, path: Path) -> None:
    if value not in choices:
        raise StreamqError(f"{path}: {key} = {value!r} is not one of {', '.join(choices)}", "fix the value")


def load_recipe(path: Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise StreamqError(f"cannot read recipe {path}: {exc.strerror}", "check the path") from exc
    return parse_recipe(text, path)
