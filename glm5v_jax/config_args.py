"""Parsing of config-file arguments: `configs/vlm_pretrain.py:tiny,mmtp=image_token`.

`parse_arg(arg, presets, **defaults)` splits the part after the colon on commas.
One bare word names the preset; `key=value` items override the defaults, each
converted to the type of its default. Unknown keys and bad values raise a
`ConfigError` that names the option and lists what is allowed.
"""
from __future__ import annotations

from typing import Any, Iterable

import ml_collections

from glm5v_jax.errors import ConfigError


def _convert(key: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on", ""):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"option {key}", f"expected a boolean, got {text!r}")
    if default is None:
        return text
    try:
        return type(default)(text)
    except ValueError:
        raise ConfigError(f"option {key}", f"expected {type(default).__name__}, got {text!r}") from None


def parse_arg(arg: str | None, presets: Iterable[str], default_preset: str,
              **defaults: Any) -> ml_collections.ConfigDict:
    """ConfigDict(preset=..., **options) from the `arg` string of `get_config(arg)`."""
    presets = tuple(presets)
    out = dict(defaults, preset=default_preset)
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            if key in defaults and isinstance(defaults[key], bool):
                out[key] = True
                continue
            if key not in presets:
                raise ConfigError("preset", f"unknown preset {key!r}; expected one of {list(presets)}")
            out["preset"] = key
            continue
        if key not in defaults:
            raise ConfigError(f"option {key}", f"unknown option; expected one of {sorted(defaults)}")
        out[key] = _convert(key, value, defaults[key])
    return ml_collections.ConfigDict(out)


def config_file(path, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the config file at `path`, loaded by path (configs are files, not a package):
    how one config builds on another (`configs/rl.py` on `configs/vlm_sft.py`) and how scripts read one."""
    import importlib.util
    from pathlib import Path

    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    if spec is None or not path.is_file():
        raise ConfigError("config", f"no config file at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
