"""Parameter counts of a config's model, built abstractly (no parameter memory).

    python -m glm5v_jax.tools.summary --config=configs/vlm_pretrain.py:glm45_air

prints `name: integer` lines (vision_params, projector_params, backbone_params,
backbone_active_params_non_embedding, mtp_params, total_params) and a per-module
table. "Active non-embedding" counts the backbone without embedding and head,
with routed experts weighted by top-k / num_experts (how GLM reports "12B active").
"""
from __future__ import annotations

import math
from collections import defaultdict

import jax
from flax import nnx

from glm5v_jax.models.specs import VLMSpec
from glm5v_jax.models.vlm import GLM5V

_ROUTED = ("gate", "up", "down")


def abstract_model(spec: VLMSpec) -> GLM5V:
    """The model with ShapeDtypeStruct leaves: nothing is allocated or computed."""
    return nnx.eval_shape(lambda: GLM5V(spec, rngs=nnx.Rngs(0)))


def _leaves(model) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    state = nnx.state(model, nnx.Variable)
    return [(tuple(str(p) for p in path), tuple(v.shape)) for path, v in nnx.to_flat_state(state)]


def count_params(spec: VLMSpec) -> dict[str, int]:
    """The summary counts for `spec` (all variables, including the router bias)."""
    counts: dict[str, int] = defaultdict(int)
    bb = spec.backbone
    active_fraction = bb.experts_per_token / bb.num_experts if bb.num_experts else 1.0
    active = 0.0
    for path, shape in _leaves(abstract_model(spec)):
        n = math.prod(shape)
        top = path[0]
        counts[f"{top}_params"] += n
        counts["total_params"] += n
        if top == "backbone" and path[1] not in ("embed", "head"):
            routed = path[1] == "moe_layers" and path[2] == "mlp" and path[3] in _ROUTED
            active += n * active_fraction if routed else n
    return {
        "vision_params": counts["vision_params"],
        "projector_params": counts["projector_params"],
        "backbone_params": counts["backbone_params"],
        "backbone_active_params_non_embedding": int(round(active)),
        "mtp_params": counts["mtp_params"],
        "total_params": counts["total_params"],
    }


def module_table(spec: VLMSpec, depth: int = 3) -> list[tuple[str, int, str]]:
    """(module path up to `depth` parts, parameter count, example leaf shapes)."""
    rows: dict[str, list] = {}
    for path, shape in _leaves(abstract_model(spec)):
        key = "/".join(path[:depth])
        row = rows.setdefault(key, [0, []])
        row[0] += math.prod(shape)
        if len(row[1]) < 2:
            row[1].append(f"{path[-1]}{list(shape)}")
    return [(k, n, " ".join(s)) for k, (n, s) in rows.items()]


def format_summary(spec: VLMSpec) -> str:
    lines = [f"{k}: {v}" for k, v in count_params(spec).items()]
    lines.append("")
    table = module_table(spec)
    width = max(len(r[0]) for r in table)
    lines.append(f"{'module':<{width}}  {'params':>16}  shapes")
    for name, n, shapes in table:
        lines.append(f"{name:<{width}}  {n:>16,}  {shapes}")
    return "\n".join(lines)


def main(argv) -> None:  # pragma: no cover - exercised through the CLI test
    del argv
    from glm5v_jax.errors import ConfigError
    from glm5v_jax.models.build import vlm_spec_from_config

    config = _CONFIG.value
    if "backbone" not in config.model:
        raise ConfigError("config.model", f"this tool counts the VLM's parameters (configs/vlm_pretrain.py, "
                                          f"configs/vlm_sft.py); trainer {config.get('trainer')!r} has no backbone. "
                                          f"Its run logs its parameter count as the hparam `params`")
    print(format_summary(vlm_spec_from_config(config.model)))


if __name__ == "__main__":
    from ml_collections import config_flags

    from glm5v_jax.errors import run_cli

    _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vlm_pretrain.py:tiny.",
                                              lock_config=True)
    jax.config.update("jax_platforms", "cpu")
    run_cli(main)  # a ConfigError: one line on stderr, exit status 2
