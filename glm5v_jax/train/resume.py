"""What may change when a run resumes, and the run settings checked before anything is built.

A checkpoint carries the config it was trained with and fingerprints of what the config names but
does not hold (the tokenizer's bytes). Resuming compares them with this run's:

  * safe changes (`SAFE_FIELDS`: run length and cadence, logging, learning-rate schedules, evaluation
    settings, the mesh -- a checkpoint is resharded onto any mesh -- and implementation choices
    that compute the same function) are accepted with a log line;
  * any other difference, or another tokenizer, is refused (ConfigError listing every differing
    field) before anything is written; a mismatch never marks a checkpoint as damaged;
  * `config.resume_accept` (comma-separated field patterns, e.g. `data.num_workers,optim.b2`)
    accepts deliberate changes; those that change the model or optimizer state's shapes are still
    refused by the checkpoint's structure check. To change the model, start a new run directory
    with `config.init_from`.
"""
from __future__ import annotations

import fnmatch
import logging
from typing import Any, Iterator, Mapping

import ml_collections

from glm5v_jax.errors import ConfigError

log = logging.getLogger(__name__)

SAFE_FIELDS = (
    # run length, cadence and bookkeeping
    "total_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "init_from",
    "log_batch_hash", "measure_pipeline_batches", "nonfinite", "max_nonfinite_skips", "resume_accept",
    # learning-rate schedules and the update's scale (the optimizer state keeps its shapes)
    "optim.groups.*.lr", "optim.groups.*.muon_lr", "optim.groups.*.warmup_steps", "optim.groups.*.decay",
    "optim.groups.*.final_fraction", "optim.groups.*.weight_decay", "optim.clip_norm",
    # evaluation only
    "data.eval_*", "data.sources.*.eval_*", "data.eval_source.*", "rl_eval.*",
    # where and how it runs, not what it computes
    "data.num_workers", "mesh.*", "model.remat", "model.attention_impl", "model.moe_impl", "loss_impl",
    "rl.admit_lookahead", "rl.admit_partial",  # the rollout engine's admission order
)
NONFINITE_MODES = ("stop", "skip")


def validate_run_settings(config: ml_collections.ConfigDict) -> None:
    """The loop's settings, before anything is compiled: ConfigError naming the field."""
    for name, low in (("total_steps", 1), ("log_every", 1), ("checkpoint_every", 1), ("keep_checkpoints", 1),
                      ("eval_every", 0)):
        value = config.get(name, None)
        if value is None or isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"config.{name}", f"expected an integer >= {low}, got {value!r}"
                              + (" (0 turns evaluation off)" if name == "eval_every" else ""))
    mode = config.get("nonfinite", "stop")
    if mode not in NONFINITE_MODES:
        raise ConfigError("config.nonfinite", f"expected one of {NONFINITE_MODES}, got {mode!r}")
    skips = config.get("max_nonfinite_skips", 0)
    if not isinstance(skips, int) or skips < 0:
        raise ConfigError("config.max_nonfinite_skips", f"expected an integer >= 0, got {skips!r}")


def _flat(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _flat(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], tree


def _normal(value: Any) -> Any:
    return [_normal(v) for v in value] if isinstance(value, (list, tuple)) else value


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted field: (saved value, current value)} of every leaf that differs (missing: `None`)."""
    a, b = dict(_flat(saved)), dict(_flat(current))
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if _normal(a.get(k)) != _normal(b.get(k))}


def _matches(field: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(field, p) for p in patterns)


def _accepted_patterns(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    return tuple(p.strip().removeprefix("config.") for p in str(config.get("resume_accept", "")).split(",")
                 if p.strip())


def check_resume(saved_config: Mapping[str, Any], saved_meta: Mapping[str, Any], current: Mapping[str, Any],
                 config: ml_collections.ConfigDict, fingerprints: Mapping[str, str], where: str) -> None:
    """Refuse (ConfigError) resuming checkpoint `where` (saved with `saved_config` and `saved_meta`) under
    this run's config (`current`: its JSON form) when anything but a safe or accepted field differs,
    when a fingerprint differs, or when `config.total_steps` is below the checkpoint's step."""
    step = int(saved_meta.get("step", 0))
    if int(config.total_steps) < step:
        raise ConfigError("config.total_steps", f"{config.total_steps} is below the step of the checkpoint it "
                                                f"resumes ({where}, step {step}); set it to {step} or more")
    accepted = _accepted_patterns(config)
    refused, noted = [], []
    for field, (old, new) in config_differences(saved_config, current).items():
        line = f"{field}: {old!r} -> {new!r}"
        (noted if _matches(field, SAFE_FIELDS + accepted) else refused).append(line)
    saved_prints = saved_meta.get("fingerprints", {}) or {}
    for field, digest in sorted(fingerprints.items()):
        old = saved_prints.get(field)
        if old is not None and old != digest:
            line = f"{field}: the file's sha256 was {old[:12]}..., now {digest[:12]}... (other content)"
            (noted if _matches(field, accepted) else refused).append(line)
    if refused:
        field = "config." + refused[0].split(":")[0] if len(refused) == 1 else "config"
        raise ConfigError(field, f"this run differs from the checkpoint it would resume ({where}, step {step}) in "
                                 f"{len(refused)} field(s) that change what is trained: " + "; ".join(refused) +
                                 ". Revert them; or, to change them deliberately, resume with "
                                 "--config.resume_accept=<field,...>, or start a new --workdir with "
                                 "--config.init_from=<this run> (copies the whole model)")
    if noted:
        log.info("resuming %s (step %d) with changed settings: %s", where, step, "; ".join(noted))
