"""QK-Clip (MuonClip, Kimi K2): cap each attention head's largest logit at tau.

After each optimizer step, head h with largest pre-softmax logit `S_h` (scale * q.k
over the visible pairs of the batch) gets `gamma_h = min(1, tau / S_h)`, and its
query and key projections are rescaled so that its logits scale by exactly gamma_h.
Heads that stay below tau are left alone. Kimi K2 used tau = 100.

Two entry points share one implementation (`_leaf_scales`):

* `qk_clip(tau, targets=...)`: an optax transform, the LAST element of a chain (it
  must see the final update). It reads the extra argument `max_logits` and returns
  u' with p + u' = clip(p + u). `nnx.Optimizer.update(model, grads, max_logits=...)`
  forwards keyword arguments to `tx.update` (flax 0.12.8), and `optax.chain` /
  `optax.partition` (`multi_transform`) forward them to every member, wrapping plain
  transforms with `optax.with_extra_args_support`. A top-level transform that is a
  plain `GradientTransformation` must be wrapped the same way before extra args
  are passed to it.
* `clip_params` / `apply_qk_clip`: the same clip on a parameter tree / an nnx model
  in place, for training loops that keep the optimizer unaware of it.

Which statistics, which weights. `S_h` is measured in the forward pass of the step,
that is with the weights BEFORE the update, and the clip is applied to the weights
AFTER it, as in Kimi K2: the statistic is one step stale, which is harmless since
the clip only has to stop logits from growing without bound.

GQA. A key head k_g is shared by the G query heads of its group, so the Kimi rule
(W_q and W_k both scaled by sqrt(gamma_h), derived for MHA) does not apply. Here
k_g is scaled by `s_g = sqrt(min_{h in g} gamma_h)` and q_h by `gamma_h / s_g`, so
every logit of head h scales by exactly gamma_h (the clip is per query head, and
unclipped heads keep their logits). For MHA (G = 1) this is Kimi's sqrt(gamma) on
both. The price: in a group where some head is clipped, the queries of its less
clipped neighbours grow (by up to 1 / s_g) to make up for the shrunken key.
Biases (q_bias, k_bias) are scaled with their kernels; RoPE is linear, so it does
not change the argument.

QK-Norm. With QK-Norm, q and k are RMS-normalised after the projection, so scaling
W_q / W_k does not change the logits, and the norm scale (the only lever left) is
shared by all heads. QK-Clip on such a layer is refused with an error.

Parameters are addressed by attention-module path: target "backbone/dense_layers/attn"
means the leaves `.../attn/q`, `/k` and, if present, `/q_bias`, `/k_bias` of the
parameter tree (`glm5v_jax.layers.attention.Attention` names). Scanned stacks carry
leading layer axes: q `[L, E, H, Dh]`, k `[L, E, KV, Dh]`, biases `[L, H|KV, Dh]`,
and then `max_logits[target]` is `[L, H]`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from glm5v_jax.errors import ConfigError
from glm5v_jax.layers.attention import Attention

MaxLogits = Mapping[str, jax.Array]

_NORM_LEAVES = ("q_norm", "k_norm")


def _key_str(key: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: Sequence[Any]) -> str:
    """A pytree key path or a module path as "a/b/0/c"."""
    return "/".join(_key_str(k) if not isinstance(k, (str, int)) else str(k) for k in path)


def qk_clip_targets(model: nnx.Module, prefixes: Sequence[str] | None = None) -> tuple[str, ...]:
    """Paths ("backbone/dense_layers/attn", ...) of the model's `Attention` modules.

    prefixes: keep only modules under one of these paths ("backbone", "mtp/depths/0");
    None keeps all. Raises ValueError for a selected module with QK-Norm, where QK-Clip
    has no effect (exclude it with `prefixes`). Paths are from `model`'s root, so pass
    the module the optimizer was built on.
    """
    wanted = None if prefixes is None else [tuple(p.strip("/").split("/")) for p in prefixes]
    found = []
    for path, module in nnx.iter_graph(model):
        if not isinstance(module, Attention):
            continue
        parts = tuple(str(p) for p in path)
        if wanted is not None and not any(parts[: len(w)] == w for w in wanted):
            continue
        name = path_str(parts)
        if module.q_norm is not None or module.k_norm is not None:
            raise ValueError(
                f"qk_clip: attention {name!r} uses QK-Norm, which makes the logits independent of "
                "the W_q/W_k scale (and its norm scale is shared by all heads), so QK-Clip cannot "
                "act on it; build it with qk_norm=False or leave it out via `prefixes`")
        found.append(name)
    if not found:
        raise ValueError(f"qk_clip: no Attention module found under prefixes {prefixes}")
    return tuple(found)


def head_scales(max_logits: jax.Array, num_kv_heads: int, tau: float) -> tuple[jax.Array, jax.Array]:
    """(q scale `[..., H]`, k scale `[..., KV]`) from max logits `[..., H]`.

    gamma_h = min(1, tau / S_h) (1 where S_h <= tau, is -inf or NaN); the k head of a
    group gets s_g = sqrt(min_g gamma_h), its q heads gamma_h / s_g. Exactly 1 for
    every head of a group that needs no clipping.
    """
    s = max_logits.astype(jnp.float32)
    gamma = jnp.where(s > tau, tau / s, 1.0)  # [..., H]
    lead, h = gamma.shape[:-1], gamma.shape[-1]
    grouped = gamma.reshape(*lead, num_kv_heads, h // num_kv_heads)  # [..., KV, G]
    k_scale = jnp.sqrt(jnp.min(grouped, axis=-1))  # [..., KV]
    q_scale = (grouped / k_scale[..., None]).reshape(*lead, h)  # [..., H]
    return q_scale, k_scale


def _leaf(name: str, leaf: str) -> str:
    """Path of parameter `leaf` of the attention at `name` ("" = the root module)."""
    return f"{name}/{leaf}" if name else leaf


def _check_tau(tau: float) -> float:
    if not tau > 0:
        raise ConfigError("tau", f"the QK-Clip threshold must be > 0, got {tau}")
    return float(tau)


def _check_targets(targets: Sequence[str]) -> tuple[str, ...]:
    if isinstance(targets, str):
        raise TypeError(f"qk_clip: targets must be a sequence of attention paths, got the string {targets!r}")
    targets = tuple(t.strip("/") for t in targets)
    if not targets:
        raise ValueError("qk_clip: targets is empty; build it with qk_clip_targets(model)")
    if len(set(targets)) != len(targets):
        raise ValueError(f"qk_clip: duplicate entries in targets {targets}")
    return targets


def _leaf_scales(leaves: Mapping[str, jax.Array], max_logits: MaxLogits, targets: tuple[str, ...],
                 tau: float) -> dict[str, jax.Array]:
    """{leaf path: scale broadcastable to the leaf} for the q/k kernels and biases of targets."""
    if max_logits is None:
        raise ValueError("qk_clip: missing the extra argument max_logits (e.g. "
                         "optimizer.update(model, grads, max_logits=model.attention_max_logits(outputs)))")
    missing = [t for t in targets if t not in max_logits]
    extra = [t for t in max_logits if t not in targets]
    if missing or extra:
        raise ValueError(f"qk_clip: max_logits keys must match targets; missing {missing}, unexpected {extra} "
                         f"(targets: {list(targets)})")
    scales = {}
    for name in targets:
        q, k = leaves.get(_leaf(name, "q")), leaves.get(_leaf(name, "k"))
        if q is None or k is None:
            raise ValueError(f"qk_clip: target {name!r} has no parameters {name}/q and {name}/k in the tree; "
                             "targets are attention-module paths from the parameters' root (qk_clip_targets)")
        norms = [n for n in _NORM_LEAVES if _leaf(name, n) in leaves]
        if norms:
            raise ValueError(f"qk_clip: attention {name!r} has QK-Norm ({', '.join(norms)}); the logits do not "
                             "depend on the W_q/W_k scale there, so QK-Clip cannot act on it")
        lead, h, kv = q.shape[:-3], q.shape[-2], k.shape[-2]
        s = jnp.asarray(max_logits[name])
        if s.shape != (*lead, h):
            raise ValueError(f"qk_clip: max_logits[{name!r}] has shape {s.shape}, expected {(*lead, h)} "
                             f"(leading layer axes of {name}/q {q.shape}, then heads)")
        if h % kv:
            raise ValueError(f"qk_clip: {name}: query heads ({h}) are not a multiple of kv heads ({kv})")
        q_scale, k_scale = head_scales(s, kv, tau)
        scales[_leaf(name, "q")] = q_scale[..., None, :, None]  # over [..., E, H, Dh]
        scales[_leaf(name, "k")] = k_scale[..., None, :, None]  # over [..., E, KV, Dh]
        if _leaf(name, "q_bias") in leaves:
            scales[_leaf(name, "q_bias")] = q_scale[..., :, None]  # over [..., H, Dh]
        if _leaf(name, "k_bias") in leaves:
            scales[_leaf(name, "k_bias")] = k_scale[..., :, None]  # over [..., KV, Dh]
    return scales


def _flat(tree: Any) -> dict[str, jax.Array]:
    return {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def clip_params(params: Any, max_logits: MaxLogits, *, targets: Sequence[str], tau: float = 100.0) -> Any:
    """`params` with the q/k kernels and biases of `targets` rescaled (see module doc)."""
    tau, targets = _check_tau(tau), _check_targets(targets)
    scales = _leaf_scales(_flat(params), max_logits, targets, tau)

    def one(path, p):
        c = scales.get(path_str(path))
        if c is None:
            return p
        return jnp.where(c == 1.0, p, p.astype(jnp.float32) * c).astype(p.dtype)

    return jax.tree_util.tree_map_with_path(one, params)


def apply_qk_clip(model: nnx.Module, max_logits: MaxLogits, *, targets: Sequence[str],
                  tau: float = 100.0) -> None:
    """`clip_params` on the model's `nnx.Param`s, in place (call after the optimizer update)."""
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    nnx.update(model, clip_params(params, max_logits, targets=targets, tau=tau))


def qk_clip(tau: float = 100.0, *, targets: Sequence[str]) -> optax.GradientTransformationExtraArgs:
    """Optax transform: u -> u' with p + u' = clip(p + u); the last element of a chain.

    Needs `params` and the extra argument `max_logits` ({target: `[..., H]`}, measured
    in the forward pass of this step); other extra arguments are ignored. The q/k
    updates of kv groups (MHA: heads) that need no clipping are kept bit for bit.
    Stateless.
    """
    tau, targets = _check_tau(tau), _check_targets(targets)

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, max_logits: MaxLogits | None = None, **extra):
        del extra
        if params is None:
            raise ValueError("qk_clip: params are required (tx.update(updates, state, params, max_logits=...))")
        scales = _leaf_scales(_flat(params), max_logits, targets, tau)

        def one(path, u, p):
            c = scales.get(path_str(path))
            if c is None:
                return u
            p32 = p.astype(jnp.float32)
            clipped = (p32 + u.astype(jnp.float32)) * c - p32
            return jnp.where(c == 1.0, u, clipped.astype(u.dtype))

        return jax.tree_util.tree_map_with_path(one, updates, params), state

    return optax.GradientTransformationExtraArgs(init, update)


def qk_clip_metrics(max_logits: MaxLogits, tau: float = 100.0) -> dict[str, jax.Array]:
    """Largest logit over all tracked heads, and how many (layer, head) pairs exceed tau."""
    values = [jnp.asarray(v, jnp.float32) for v in max_logits.values()]
    if not values:
        return {}
    return {
        "qk_clip/max_logit": jnp.max(jnp.stack([jnp.max(v) for v in values])),
        "qk_clip/clipped_heads": sum(jnp.sum(v > tau) for v in values).astype(jnp.int32),
    }
