"""Settings as a user gives them: `--set KEY=VALUE`, `--variant NAME:...`, `--config FILE`, `--preset` and flags,
layered into one validated `RunConfig`; a refused value is named as the user wrote it (`--set assembly.top_k=0`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from perpcs.errors import InputError
from perpcs.rules import with_rule_fixed
from perpcs.settings import PRESETS, RunConfig
from perpcs.utils import deep_merge, read_json

# `--quick`: tiny budgets that check the harness; the numbers mean nothing.
QUICK = ["task_train.steps=4", "sharer_train.steps=3", "gate_train.steps=2", "n_targets=2", "n_sharers=3",
         "min_sharer_items=1"]
# The flags of `perpcs pipeline` and `bench` that set a RunConfig field directly
FLAGS = {"data": "--data", "seed": "--seed", "base": "--base", "n_targets": "--targets", "n_sharers": "--sharers"}


def parse_overrides(pairs: list[str], what: str = "--set") -> dict:
    """`--set a.b=value` pairs into a nested dict (values parsed as JSON when they parse, else text)."""
    out: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key or "" in key.split("."):
            raise InputError(f"{what} {pair!r}: expected KEY=VALUE, e.g. sharer_train.lr=5e-4")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise InputError(f"{what} {pair!r}: {p} is set to a value, so it has no field {leaf!r}")
        node[leaf] = value
    return out


def parse_variants(specs: list[str]) -> dict[str, dict]:
    """'NAME:KEY=VALUE,KEY=VALUE' -> {NAME: nested settings}, e.g. 'act:key=activation,assembly.mix=cat'. A pair
    starts only at a comma followed by KEY=, so a JSON list value keeps its commas ('x:calibration.rules=["a","b"]')."""
    out = {}
    for spec in specs:
        name, sep, pairs = spec.partition(":")
        if not sep or not name or not pairs:
            raise InputError(f"--variant {spec!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
        out[name] = parse_overrides(re.split(r",(?=[A-Za-z_][\w.]*=)", pairs), f"--variant {name}:")
    return out


def _given(layer: Any, loc: tuple) -> tuple[int, Any]:
    """How much of `loc` `layer` holds (a union's error adds its branch, e.g. strength.float), and the value."""
    for n, part in enumerate(loc):
        if not isinstance(layer, dict) or part not in layer:
            return n, layer
        layer = layer[part]
    return len(loc), layer


def setting_errors(e: ValidationError, origins: list[tuple[str, Any]], written: dict[str, str] = {}) -> InputError:
    """A refusal naming each bad setting where the user gave it: `--set KEY=VALUE` (`written`: KEY -> the pair
    as typed), the --config file's field, a flag, or (a value they did not give) the setting's name.
    `origins`: (how, the settings given that way), the later ones winning."""
    parts: dict[str, list[str]] = {}
    for err in e.errors():
        loc = tuple(str(p) for p in err["loc"])
        msg = "not a setting" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        where = f"setting {'.'.join(loc)}" if loc else "settings"
        for how, layer in reversed(origins):
            n, value = _given(layer, loc)
            if how == "--set":  # the longest KEY typed that the error is under (strength, for strength.float)
                n = max((len(k.split(".")) for k in written if loc[:len(k.split("."))] == tuple(k.split("."))),
                        default=0)
            if loc and (n == len(loc) or (n and (how == "--set" or not isinstance(value, dict)))):
                name = ".".join(loc[:n])  # given here, or a value where a union's branch failed (strength.float)
                where = {"--set": f"--set {written.get(name, f'{name}={json.dumps(value)}')}",
                         "flags": f"{FLAGS.get(name, name)} {value}"}.get(how, f"{how}: field '{name}'")
                if err["type"] == "list_type" and isinstance(value, str):  # `--set x=a,b` reads as text
                    msg += f" (a list is written in JSON: {json.dumps(value.split(','), separators=(',', ':'))})"
                break
        parts.setdefault(where, []).append(msg)
    return InputError("; ".join(f"{where}: {' or '.join(msgs)}" for where, msgs in parts.items()))


def build_config(data: str | Path, base: str | None = None, seed: int = 0, targets: int | None = None,
                 sharers: int | None = None, config: str | Path | None = None, overrides: list[str] = (),
                 quick: bool = False, preset: str | None = None) -> RunConfig:
    """A RunConfig from defaults < --preset < --config file < flags < (`QUICK` with `quick`) < --set overrides
    (nested sections merge key by key). A preset, file or --set that fixes the selection rule (key,
    assembly.mix, ...) turns calibration off, unless it sets calibration.enabled itself."""
    if preset is not None and preset not in PRESETS:
        raise InputError(f"--preset {preset!r}: known presets are {', '.join(PRESETS)}")
    from_file = read_json(config) if config else {}
    if not isinstance(from_file, dict):
        raise InputError(f"{config}: expected a JSON object of RunConfig fields, got a {type(from_file).__name__}")
    flags = {k: v for k, v in {"data": str(data), "seed": seed, "base": base, "n_targets": targets,
                               "n_sharers": sharers}.items() if v is not None}
    origins = [(f"--preset {preset}", PRESETS.get(preset, {})), (str(config), from_file), ("flags", flags),
               ("--quick", parse_overrides(QUICK if quick else [])), ("--set", parse_overrides(list(overrides)))]
    cfg = RunConfig(data=str(data)).model_dump()
    given: dict = {}
    for _, layer in origins:
        deep_merge(cfg, layer)
        deep_merge(given, layer)
    try:
        return RunConfig.model_validate(deep_merge(cfg, with_rule_fixed(given)))
    except ValidationError as e:
        raise setting_errors(e, origins, {pair.partition("=")[0]: pair for pair in overrides}) from None


def check_variants(config: RunConfig, variants: dict[str, dict]) -> None:
    """Each bench variant's settings, validated on `config` before any step runs."""
    for name, settings in variants.items():
        try:
            config.updated(settings)
        except ValidationError as e:
            raise setting_errors(e, [(f"--variant {name}", settings)]) from None
