"""Stage chaining: start a run from a subtree of another run's model (`config.init_from`).

    --config.init_from=WORKDIR[@STEP]:SRC=DST[,SRC=DST...]

copies the subtree `SRC` of the model saved in another run directory (its newest checkpoint that
reads, or step `STEP`) into the subtree `DST` of this run's model. Paths are dotted attribute
paths below the model (`image.encoder`, `encoder`, `vision`); `''` is the whole model, so
`RUN:=` (or just `RUN`) copies everything. The optimizer starts fresh. Every leaf under DST must
exist under SRC with the same shape (else ConfigError naming both paths and shapes, before
training); leaves of SRC that DST lacks are listed in the log. Arrays are read straight into this
run's shardings (only the copied subtree is read), so the source may have run on another mesh.
The source run directory is only read, never changed.

Chain of the report, as flags:
  stage 2 (cogvit_siglip) image tower -> stage 1 student:  teacher_run=RUN2 (a teacher), or
      init_from=RUN2:image.encoder=encoder
  stage 1 (cogvit_mim) student -> VLM vision tower:        init_from=RUN1:encoder=vision
  VLM pre-training -> SFT (whole model):                   init_from=RUN3
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from glm5v_jax.errors import ConfigError
from glm5v_jax.paths import as_path

log = logging.getLogger(__name__)
FIELD = "config.init_from"


@dataclasses.dataclass(frozen=True)
class InitFrom:
    """A parsed `config.init_from`."""

    workdir: str
    step: int | None  # None: the newest step that reads
    mapping: tuple[tuple[str, str], ...]  # (SRC, DST) dotted paths below the model


def parse_init_from(text: str) -> InitFrom:
    """`WORKDIR[@STEP][:SRC=DST[,...]]` -> InitFrom (ConfigError naming the field on bad input).
    The mapping is the part after the last ':' when it contains '=' (so gs:// paths work)."""
    head, sep, tail = text.rpartition(":")
    if sep and "=" in tail:
        where, pairs = head, tail.split(",")
    else:
        where, pairs = text, ["="]
    mapping = []
    for pair in pairs:
        src, eq, dst = pair.partition("=")
        if not eq:
            raise ConfigError(FIELD, f"{pair!r} is not SRC=DST (expected WORKDIR[@STEP]:SRC=DST[,...])")
        mapping.append((src.strip(), dst.strip()))
    step = None
    base, at, num = where.rpartition("@")
    if at and num.isdigit():
        where, step = base, int(num)
    if not where.strip():
        raise ConfigError(FIELD, f"{text!r} names no run directory (expected WORKDIR[@STEP]:SRC=DST[,...])")
    dsts = [d for _, d in mapping]
    for i, a in enumerate(dsts):
        for b in dsts[i + 1:]:
            if _within(_split(a), _split(b)) or _within(_split(b), _split(a)):
                raise ConfigError(FIELD, f"destinations {a!r} and {b!r} overlap")
    return InitFrom(where.strip(), step, tuple(mapping))


def _split(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.replace("/", ".").split(".") if p)


def _within(path: tuple[str, ...], prefix: tuple[str, ...]) -> bool:
    return path[:len(prefix)] == prefix


def _key(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _flat_metadata(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat_metadata(v, prefix + (str(k),)))
        return out
    return {prefix: tree}


def _nest(flat: dict[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def _steps(directory: epath.Path) -> list[int]:
    if not directory.exists():
        return []
    return sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / "state").exists()),
                  reverse=True)


def _shown(path: tuple[str, ...]) -> str:
    return ".".join(p for p in path if p != "value") or "<model>"


def apply_init_from(text: str, state: Any, shardings: Any) -> Any:
    """`state` (an nnx.State with a `model` subtree, sharded as `shardings`) with the subtrees named
    by `text` replaced by the other run's arrays, placed with this run's shardings."""
    return restore_from_run(text, state, shardings)[0]


def restore_from_run(text: str, state: Any, shardings: Any) -> tuple[Any, int]:
    """`apply_init_from`, and the checkpoint step the arrays came from."""
    spec = parse_init_from(text)
    ckpt_dir = as_path(spec.workdir) / "checkpoints"
    steps = _steps(ckpt_dir)
    if spec.step is not None:
        if spec.step not in steps:
            raise ConfigError(FIELD, f"{ckpt_dir} has no checkpoint of step {spec.step}; it has {sorted(steps)}")
        steps = [spec.step]
    if not steps:
        raise ConfigError(FIELD, f"{ckpt_dir} holds no checkpoint (is {spec.workdir!r} a run directory?)")

    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    sh_leaves = jax.tree.leaves(shardings)
    dst_leaves = {tuple(_key(e) for e in path): (leaf, sh) for (path, leaf), sh in zip(leaves, sh_leaves)}
    last_error: Exception | None = None
    for step in steps:
        item = ckpt_dir / str(step) / "state"
        try:
            meta = _flat_metadata(ocp.StandardCheckpointer().metadata(item).item_metadata.tree)
        except Exception as e:  # noqa: BLE001 - an unreadable step: try an older one
            last_error = e
            log.warning("init_from: %s does not read (%s); trying an older step", item, e)
            continue
        copies = _plan_copies(spec, meta, dst_leaves)  # ConfigError on a bad path or shape: not retried
        target = _nest({src: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for src, (_, leaf, _) in copies.items()})
        args = _nest({src: ocp.ArrayRestoreArgs(global_shape=leaf.shape, dtype=leaf.dtype, sharding=sh)
                      for src, (_, leaf, sh) in copies.items()})
        try:
            restored = ocp.PyTreeCheckpointer().restore(
                item, args=ocp.args.PyTreeRestore(item=target, restore_args=args, partial_restore=True))
        except Exception as e:  # noqa: BLE001 - a corrupt step: try an older one
            last_error = e
            log.warning("init_from: %s does not restore (%s); trying an older step", item, e)
            continue
        flat = _flat_metadata(restored)
        by_dst = {dst: flat[src] for src, (dst, _, _) in copies.items()}
        n_params = sum(math.prod(leaf.shape) for _, leaf, _ in copies.values())
        for src, dst in spec.mapping:
            log.info("init_from %s@%d: model.%s -> model.%s", spec.workdir, step, src or "<all>", dst or "<all>")
        log.info("init_from: copied %d leaves (%s values); the optimizer starts fresh", len(by_dst),
                 f"{n_params:,}")

        def pick(path, leaf):
            return by_dst.get(tuple(_key(e) for e in path), leaf)

        return jax.tree_util.tree_map_with_path(pick, state), step
    raise ConfigError(FIELD, f"no checkpoint in {ckpt_dir} could be read (steps {steps}; last error: {last_error})")


def _plan_copies(spec: InitFrom, meta: dict[tuple[str, ...], Any],
                 dst_leaves: dict[tuple[str, ...], tuple[Any, Any]]) -> dict[tuple[str, ...], tuple]:
    """{source key: (destination key, destination leaf, its sharding)}; refuses missing paths and
    shape mismatches, naming both sides."""
    copies = {}
    for src, dst in spec.mapping:
        src_p, dst_p = ("model",) + _split(src), ("model",) + _split(dst)
        under_src = {k[len(src_p):]: m for k, m in meta.items() if _within(k, src_p)}
        under_dst = {k[len(dst_p):]: v for k, v in dst_leaves.items() if _within(k, dst_p)}
        if not under_src:
            children = sorted({k[len(src_p) - 1] for k in meta if _within(k, src_p[:-1]) and len(k) >= len(src_p)})
            raise ConfigError(FIELD, f"SRC {_shown(src_p[1:])}: no such path in the model of "
                                     f"{spec.workdir}; below {_shown(src_p[1:-1])} it has {children}")
        if not under_dst:
            children = sorted({k[len(dst_p) - 1] for k in dst_leaves if _within(k, dst_p[:-1])
                               and len(k) >= len(dst_p)})
            raise ConfigError(FIELD, f"DST {_shown(dst_p[1:])}: no such path in this run's model; below "
                                     f"{_shown(dst_p[1:-1])} it has {children}")
        missing = sorted(set(under_dst) - set(under_src))
        if missing:
            raise ConfigError(FIELD, f"model.{_shown(dst_p[1:] + missing[0])} has no counterpart "
                                     f"model.{_shown(src_p[1:] + missing[0])} in {spec.workdir} "
                                     f"({len(missing)} such leaves; SRC={src!r}, DST={dst!r})")
        for rel, (leaf, sh) in under_dst.items():
            m = under_src[rel]
            if tuple(m.shape) != tuple(leaf.shape):
                raise ConfigError(FIELD, f"shape mismatch: model.{_shown(src_p[1:] + rel)} in {spec.workdir} is "
                                         f"{tuple(m.shape)}, model.{_shown(dst_p[1:] + rel)} here is "
                                         f"{tuple(leaf.shape)}")
            copies[src_p + rel] = (dst_p + rel, leaf, sh)
        extra = sorted(set(under_src) - set(under_dst))
        if extra:
            log.info("init_from: %d leaves of model.%s are not copied (no counterpart here), e.g. %s", len(extra),
                     src or "<all>", ", ".join(_shown(e) for e in extra[:5]))
    return copies
