"""Stage-1 teacher features: each teacher's view of the image, its tokens on the student's grid,
and an optional precomputed cache of those tokens.

Views. A teacher whose patch size and patch budget are the student's reads the student's NaFlex
view. Any other teacher reads its own view of the same image (`ImageBatchConfig.teacher_views`,
merge 1) with `config.teachers.<name>.max_patches` patches (0: about the student's pixel area,
round(max_patches x (p_student / p_teacher)^2)); its tokens are resampled bilinearly onto the
student's grid (`models.cogvit_mim.resample_tokens`) before standardisation and the loss.

Cache. `build_cache` (CLI below) runs every configured teacher (frozen, bfloat16 compute as the
config says, jitted, batched) once over every record of every configured training source
(unshuffled, one epoch) and stores its tokens on the student's grid. Layout of the directory:

    meta.json       format/version, student patch size / budget / merge, per teacher kind, variant,
                    checkpoint, seed, overrides, max_patches, dim, patch size and view, per source
                    its settings, size and first row, counts; written last: no meta.json, no cache
    ids.npy         [num_records] str: tagged record id (`<source>/<id>`, as `mix_sources` tags
                    them) of each row; "" for a record the build skipped (undecodable, too small)
    <teacher>.npy   [num_records, student max_patches, D] uint16: the bfloat16 bit patterns of the
                    tokens (view as `ml_dtypes.bfloat16` or `jax.lax.bitcast_convert_type`), zero
                    at padding, in the student view's token order; `np.load(..., mmap_mode="r")`

Rows follow the sources in `config.data.sources` order (a ConfigDict: by name), each source's
training part (`glm5v_jax.data.source_registry`) in its own record order. The build writes into a
`<dir>.tmp-*` sibling and renames it into place when complete, so a crashed build never leaves a
directory that looks like a cache. `open_cache` checks meta.json against the config and
`CacheLookup` attaches each record's rows to its example as `teacher/<name>` (uint16, as stored);
a record not in the cache is skipped and counted as `skipped/not_in_teacher_cache`.

Caveat: the cache is valid only because NaFlex preprocessing is deterministic and the teachers see
the unmasked image (the MIM mask applies to the student only). Any random augmentation of the
image (crops, flips, colour jitter) would invalidate it: the cached targets would no longer
describe the image the student sees.

    python -m glm5v_jax.train.teacher_cache --config=configs/cogvit_mim.py:tiny --cache_dir=DIR \\
        [--workdir=RUN] [--batch_size=N] [--overwrite]

(--workdir: where the shapes-world sources live when config.data.data_dir is empty, as for the
trainer: <workdir>/data.)

Paths go through `etils.epath`, but the cache directory must be local: the token arrays are
numpy memory maps, which need a file on local disk. A `gs://...` cache directory is refused with a
ConfigError naming the field (`config.teacher_cache` or `--cache_dir`); copy the cache to local
disk first (e.g. `gsutil -m cp -r`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import threading
import time
from typing import Any, Mapping

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from glm5v_jax.errors import ConfigError, run_cli
from glm5v_jax.data.image_batches import ImageBatchConfig, ProcessImageRecord, view_key
from glm5v_jax.data.source_registry import checked_sources, open_sources
from glm5v_jax.data.sources import TagSource
from glm5v_jax.data.templates import as_str
from glm5v_jax.models.cogvit_mim import resample_tokens
from glm5v_jax.paths import as_path, is_uri

log = logging.getLogger(__name__)
FORMAT, VERSION = "glm5v_jax.teacher_cache", 1
STUDENT_KEYS = ("patches", "patch_yx", "valid")
MISSING = "skipped/not_in_teacher_cache"
View = tuple[int, int]  # (patch_size, max_patches) of a teacher's own view


# ----------------------------------------------------------------------------- views
def teacher_view(config: ml_collections.ConfigDict, name: str, teacher_patch: int) -> View | None:
    """None: the teacher reads the student's view; else (patch_size, max_patches) of its own."""
    v = config.model.vision
    setting = int(config.teachers[name].get("max_patches", 0))
    if setting < 0:
        raise ConfigError(f"config.teachers.{name}.max_patches", f"must be >= 0 (0: the student's pixel area), "
                         f"got {setting}")
    if teacher_patch == v.patch_size and setting in (0, v.max_patches):
        return None
    return teacher_patch, setting or max(1, round(v.max_patches * (v.patch_size / teacher_patch) ** 2))


def teacher_views(config: ml_collections.ConfigDict, patch_sizes: Mapping[str, int]) -> dict[str, View | None]:
    """{teacher: its view} from each teacher's patch size."""
    return {name: teacher_view(config, name, p) for name, p in patch_sizes.items()}


def distinct_views(views: Mapping[str, View | None]) -> tuple[View, ...]:
    """The extra views the data pipeline must produce (teachers of one patch size share one)."""
    return tuple(sorted({v for v in views.values() if v is not None}))


def cache_key(name: str) -> str:
    return f"teacher/{name}"


def step_keys(views: Mapping[str, View | None], cached: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Batch keys a train step reads: the student view, the teachers' views, cached features."""
    extra = [view_key(k, *v) for v in distinct_views(views) for k in STUDENT_KEYS]
    return STUDENT_KEYS + tuple(extra) + tuple(cache_key(n) for n in cached)


def student_grid_tokens(teacher: nnx.Module, batch: Mapping[str, jax.Array], view: View | None) -> jax.Array:
    """The teacher's tokens on the student's grid, `[B, N_student, D]` float32 (zero at padding)."""
    yx, valid = batch["patch_yx"], batch["valid"]
    if view is None:
        return teacher(batch["patches"], yx, valid)["tokens"].astype(jnp.float32)
    patches, t_yx, t_valid = (batch[view_key(k, *view)] for k in STUDENT_KEYS)
    return resample_tokens(teacher(patches, t_yx, t_valid)["tokens"], t_yx, t_valid, yx, valid)


def cached_tokens(batch: Mapping[str, jax.Array], name: str) -> jax.Array:
    """`teacher/<name>` (uint16 bfloat16 bits `[B, N, D]`) -> float32."""
    return jax.lax.bitcast_convert_type(batch[cache_key(name)], jnp.bfloat16).astype(jnp.float32)


# ----------------------------------------------------------------------------- meta
def expected_meta(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The settings a cache depends on, as the config gives them (JSON types)."""
    v = config.model.vision
    meta = {
        "student": {"patch_size": int(v.patch_size), "max_patches": int(v.max_patches), "merge": int(v.merge_size)},
        "teachers": {name: {"kind": t.kind, "variant": t.variant, "checkpoint": str(t.checkpoint), "seed": int(t.seed),
                            "overrides": t.overrides.to_dict(), "max_patches": int(t.get("max_patches", 0))}
                     for name, t in config.teachers.items()},
        # the training part of each source (its weight and eval part do not change the records)
        "sources": {name: {k: val for k, val in src.to_dict().items() if k != "weight" and not k.startswith("eval_")}
                    for name, src in checked_sources(config.data).items()},
    }
    return json.loads(json.dumps(meta))


def check_meta(meta: Mapping[str, Any], expected: Mapping[str, Any], meta_path: os.PathLike | str,
               field: str = "") -> None:
    """Raises naming the first field where the cache's meta differs from the config's settings.

    Teacher and source names must be the same sets; `overrides` compare as a whole; elsewhere only
    the config's fields are compared (the meta also holds derived values: dims, sizes, rows)."""
    for key, want in expected.items():
        path = f"{field}.{key}" if field else key
        have = meta.get(key) if isinstance(meta, Mapping) else None
        if path in ("teachers", "sources") and isinstance(have, Mapping) and set(have) != set(want):
            raise ValueError(f"teacher cache {meta_path}: {path} are {sorted(have)} in the cache but "
                             f"{sorted(want)} in the config; rebuild the cache")
        if isinstance(want, Mapping) and isinstance(have, Mapping) and key != "overrides":
            check_meta(have, want, meta_path, path)
        elif have != want:
            raise ValueError(f"teacher cache {meta_path}: {path} is {have!r} in the cache but {want!r} in the "
                             f"config; rebuild the cache (python -m glm5v_jax.train.teacher_cache)")


# ----------------------------------------------------------------------------- reading
class CacheLookup:
    """`attach` for `make_image_batch_iterator`: {teacher/<name>: uint16 `[N, D]`} of the record's
    tagged id, or `MISSING`. Picklable (grain workers): opens the memory maps on first use."""

    def __init__(self, path: str | os.PathLike, names: tuple[str, ...]):
        self.path, self.names = str(path), tuple(names)
        self._rows: dict[str, int] | None = None
        self._arrays: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def _open(self) -> dict[str, int]:
        with self._lock:
            if self._rows is None:
                directory = epath.Path(self.path)
                self._arrays = {n: np.load(directory / f"{n}.npy", mmap_mode="r") for n in self.names}
                ids = np.load(directory / "ids.npy")
                self._rows = {str(rid): row for row, rid in enumerate(ids) if rid}
        return self._rows

    def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray] | str:
        row = (self._rows if self._rows is not None else self._open()).get(as_str(record.get("id")))
        if row is None:
            return MISSING
        return {cache_key(n): np.array(a[row]) for n, a in self._arrays.items()}

    def __getstate__(self):
        return {"path": self.path, "names": self.names}

    def __setstate__(self, state):
        self.__init__(state["path"], state["names"])


@dataclasses.dataclass(frozen=True)
class TeacherCache:
    path: epath.Path
    meta: dict[str, Any]

    @property
    def dims(self) -> dict[str, int]:
        return {name: int(t["dim"]) for name, t in self.meta["teachers"].items()}

    def lookup(self) -> CacheLookup:
        return CacheLookup(self.path, tuple(self.meta["teachers"]))


def local_cache_dir(path: str | os.PathLike, field: str) -> epath.Path:
    """`path` as an absolute local epath; ConfigError naming `field` for a URI (numpy memory maps
    need a local file)."""
    if is_uri(path):
        raise ConfigError(field, f"{path} is not on local disk; the teacher cache is memory-mapped with numpy, "
                                 "which needs local files: copy it to local disk (e.g. gsutil -m cp -r) and give "
                                 "that path")
    return as_path(path)


def open_cache(path: str | os.PathLike, config: ml_collections.ConfigDict) -> TeacherCache:
    """A complete cache that matches `config` (raises otherwise, naming the field and meta.json)."""
    path = local_cache_dir(path, "config.teacher_cache")
    meta_path = path / "meta.json"
    if not path.is_dir():
        raise FileNotFoundError(f"config.teacher_cache: {path} is not a directory; build it with "
                                f"python -m glm5v_jax.train.teacher_cache --config=... --cache_dir={path}")
    if not meta_path.is_file():
        raise FileNotFoundError(f"config.teacher_cache: {path} has no meta.json, so it is not a complete teacher "
                                "cache (a build that did not finish?); rebuild it")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"teacher cache {meta_path}: format {meta.get('format')!r} version {meta.get('version')!r}, "
                         f"expected {FORMAT!r} version {VERSION}")
    check_meta(meta, expected_meta(config), meta_path)
    n, width = int(meta["num_records"]), int(meta["student"]["max_patches"])
    for name, t in meta["teachers"].items():
        arr = np.load(path / f"{name}.npy", mmap_mode="r")
        if arr.shape != (n, width, int(t["dim"])) or arr.dtype != np.uint16:
            raise ValueError(f"teacher cache {path / (name + '.npy')}: {arr.dtype} {arr.shape}, expected uint16 "
                             f"{(n, width, int(t['dim']))} per {meta_path}")
    return TeacherCache(path, meta)


# ----------------------------------------------------------------------------- building
def named_train_sources(data: ml_collections.ConfigDict,
                        workdir: str | os.PathLike | None) -> dict[str, grain.MapDataset]:
    """Each `config.data.sources.<name>` (its training part), unshuffled, ids tagged `<name>/<id>`:
    the datasets the trainer mixes (`source_registry.open_sources`)."""
    if not data.data_dir and not workdir:
        raise ConfigError("config.data.data_dir", "is empty and no workdir was given: the shapes-world sources live "
                         "under <workdir>/data (pass --workdir=<the run directory>)")
    named = open_sources(data, workdir or ".").train
    return {name: (ds if isinstance(ds, grain.MapDataset) else grain.MapDataset.source(ds)).map(TagSource(name))
            for name, ds in named.items()}


@dataclasses.dataclass(frozen=True)
class _Prepare:
    """grain map_with_index: record -> processed example (or skip) with its row and tagged id."""

    process: ProcessImageRecord

    def __call__(self, index: int, record: Mapping[str, Any]) -> dict[str, Any]:
        out = self.process(record)
        out["row"] = index
        out["id"] = as_str(record.get("id")) if isinstance(record, Mapping) else ""
        return out


def _write_meta(directory: epath.Path, meta: Mapping[str, Any]) -> None:
    with (directory / "meta.json").open("w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fill(arrays: Mapping[str, np.ndarray], sources: Mapping[str, grain.MapDataset], process: ProcessImageRecord,
          forward, keys: tuple[str, ...], batch_size: int, num_workers: int) -> tuple[list[str], dict[str, int]]:
    """Writes every record's tokens into `arrays` (rows in source order); (ids per row, skip counts)."""
    total = sum(len(ds) for ds in sources.values())
    ids, rows_of, skipped, pending = [""] * total, {}, {}, []
    t0, offset = time.time(), 0

    def flush():
        examples = pending + [pending[-1]] * (batch_size - len(pending))  # static shapes: pad with a copy
        got = jax.device_get(forward({k: jnp.asarray(np.stack([e[k] for e in examples])) for k in keys}))
        rows = np.asarray([e["row"] for e in pending])
        for n, arr in arrays.items():
            arr[rows] = got[n][:len(pending)]
        pending.clear()

    for name, ds in sources.items():
        it = ds.map_with_index(_Prepare(process)).to_iter_dataset()
        if num_workers > 0:
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
        for el in it:
            el["row"] += offset
            if "skip" in el:
                skipped[el["skip"]] = skipped.get(el["skip"], 0) + 1
                continue
            if el["id"] in rows_of:
                raise ConfigError(f"config.data.sources.{name}", f"record id {el['id']!r} occurs twice (rows "
                                 f"{rows_of[el['id']]} and {el['row']}); the cache looks records up by id")
            rows_of[el["id"]], ids[el["row"]] = el["row"], el["id"]
            pending.append(el)
            if len(pending) == batch_size:
                flush()
        offset += len(ds)
        log.info("teacher cache: source %s done (%d records, %.0f s)", name, len(ds), time.time() - t0)
    if pending:
        flush()
    return ids, skipped


def build_cache(config: ml_collections.ConfigDict, cache_dir: str | os.PathLike, *,
                workdir: str | os.PathLike | None = None, batch_size: int = 0, overwrite: bool = False) -> epath.Path:
    """Runs every teacher over every training record once and writes the cache (module docstring);
    returns its directory. `overwrite` replaces an existing one (only once the new one is complete)."""
    from glm5v_jax.models.build import teachers_from_config

    out = local_cache_dir(cache_dir, "--cache_dir")
    if out.exists() and not overwrite:
        raise FileExistsError(f"--cache_dir: {out} exists; remove it or pass overwrite (--overwrite)")
    v = config.model.vision
    width, bs = int(v.max_patches), int(batch_size or config.data.batch_size)
    teachers = teachers_from_config(config.teachers)
    views = teacher_views(config, {n: t.patch_size for n, t in teachers.items()})
    modules = nnx.Dict({n: t.module for n, t in teachers.items()})
    sources = named_train_sources(config.data, workdir)
    process = ProcessImageRecord(ImageBatchConfig(batch_size=1, patch_size=v.patch_size, max_patches=width,
                                                  merge=v.merge_size, shuffle=False, num_epochs=1,
                                                  teacher_views=distinct_views(views)))

    @nnx.jit
    def forward_jit(modules, batch):  # frozen teachers -> bfloat16 bits on the student's grid
        return {n: jax.lax.bitcast_convert_type(student_grid_tokens(modules[n], batch, views[n]).astype(jnp.bfloat16),
                                                jnp.uint16) for n in views}

    t0, total = time.time(), sum(len(ds) for ds in sources.values())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = epath.Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        arrays = {n: np.lib.format.open_memmap(tmp / f"{n}.npy", mode="w+", dtype=np.uint16,
                                               shape=(total, width, t.dim)) for n, t in teachers.items()}
        ids, skipped = _fill(arrays, sources, process, lambda b: forward_jit(modules, b), step_keys(views), bs,
                             int(config.data.get("num_workers", 0)))
        for arr in arrays.values():
            arr.flush()
        arrays.clear()
        np.save(tmp / "ids.npy", np.asarray(ids, dtype=str))
        meta = expected_meta(config)
        for n, t in teachers.items():
            meta["teachers"][n].update(dim=int(t.dim), patch_size=int(t.patch_size), view=views[n], source=t.source)
        first = np.cumsum([0] + [len(ds) for ds in sources.values()])
        for (name, ds), row in zip(sources.items(), first):
            meta["sources"][name].update(size=len(ds), first_row=int(row))
        cached = sum(bool(i) for i in ids)
        meta.update(format=FORMAT, version=VERSION, num_records=total, cached_records=cached, skipped=skipped,
                    storage="bfloat16 bits as uint16: <teacher>.npy [num_records, student max_patches, dim]",
                    created=time.strftime("%Y-%m-%d %H:%M:%S"))
        _write_meta(tmp, meta)  # last: its presence marks a complete cache
        old = out.with_name(f"{out.name}.old-{os.getpid()}") if out.exists() else None
        if old is not None:
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            old.rmtree(missing_ok=True)
    except BaseException:
        tmp.rmtree(missing_ok=True)
        raise
    log.info("teacher cache %s: %d of %d records, skipped %s (%.0f s)", out, cached, total, skipped, time.time() - t0)
    return out


def _cli() -> None:
    from absl import flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "Stage-1 config, e.g. configs/cogvit_mim.py:tiny.",
                                             lock_config=True)
    cache_dir = flags.DEFINE_string("cache_dir", None, "Directory to write (must not exist).", required=True)
    workdir = flags.DEFINE_string("workdir", "", "Run directory whose data/ holds the shapes-world sources "
                                  "(when config.data.data_dir is empty).")
    batch_size = flags.DEFINE_integer("batch_size", 0, "Images per teacher forward; 0: config.data.batch_size.")
    overwrite = flags.DEFINE_bool("overwrite", False, "Replace an existing cache directory.")

    def main(argv) -> None:
        del argv
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
        logging.getLogger("glm5v_jax").setLevel(logging.INFO)
        build_cache(config.value, cache_dir.value, workdir=workdir.value or None, batch_size=batch_size.value,
                    overwrite=overwrite.value)

    run_cli(main)


if __name__ == "__main__":
    _cli()
