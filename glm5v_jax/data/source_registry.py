"""Data sources by kind: the one table every training stage reads its data through, and the one
tokenizer of every stage.

    config.data.sources.<name> = source_config(kind, weight=..., train_split=..., ...)

Fields of every source:
  kind         a key of SOURCE_KINDS: shapes_world | tfds | array_record | rl_tasks
  weight       its share of the training mixture (>= 0; the weights are normalised)
  train_split  the part it trains on (required)
  train_size   records of that part: shapes_world generates that many; tfds and array_record
               read the first `train_size` (0: all)
  eval_split   the part it is evaluated on ("": none)
  eval_size    as train_size, for eval_split
Fields of each kind (their defaults are the `fields` of its SOURCE_KINDS entry):
  shapes_world  build_seed. The embedded generator, built on first use under config.data.data_dir
                (`<workdir>/data` when empty), one TFDS dataset per source with just its splits.
                Splits: train, validation (1 to 6 objects per image), text_train, text_validation
                (text-only documents), single_object_train, single_object_validation (exactly one
                object per image: clean shape and colour labels for evaluation).
  tfds          name, data_dir, image_key, text_key: any TFDS dataset with an image and a text
                feature (nested keys as "a/b"); splits are TFDS split strings ("train[:90%]").
  array_record  parse, skip_bad_files: the splits are comma-separated globs of ArrayRecord files
                (local or gs://, wildcards in any path component after the first) holding
                `tf.train.Example` records with flat features, as TFDS writes them
                (parse=tf_example), or JSON. A file that cannot be opened (truncated, another
                format) is a ConfigError naming it, or with skip_bad_files=True left out with a
                warning; a record that cannot be read or parsed (a corrupt shard) is skipped, its
                file and position logged, and counted as skipped/bad_record.
  rl_tasks      families, seed. The RL task families' prompts with their gold answers (`rl.tasks.GoldRecords`:
                the task's image and one QA item), so SFT shows the answer formats RL rewards; families
                "" = those SFT data have not shown (`rl.tasks.SFT_FAMILIES`: pointing, choice, charts);
                splits train and validation, drawn from seeds `seed` and `seed` + 1 (default 2 and 3:
                apart from RL's training and evaluation prompts).
Every source yields records in the shapes-world layout (`image` bytes, `caption_en`, `qa_json`,
`boxes_json`, `text`, ...; see `glm5v_jax.data.pipeline`), so the VLM pipeline and the CogViT
image batches read any of them.

`open_sources(config.data, workdir)` checks every entry (ConfigError naming the field: unknown
kind or field, negative weight, no sources, a glob that matches nothing, ...) and opens them;
`DataSources.mixture(part, seed)` mixes them by weight. `tokenizer_from_config(config.data,
workdir)`: `config.data.tokenizer` (a SentencePiece model path), or a model trained on the texts
of the shapes-world sources, cached in the data directory under a name that says what it was
trained on.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Mapping

import ml_collections
from etils import epath

from glm5v_jax.data import shapes_world
from glm5v_jax.data.tokenizer import Tokenizer, train_tokenizer
from glm5v_jax.errors import ConfigError
from glm5v_jax.paths import as_path, expand_globs

log = logging.getLogger(__name__)

COMMON_FIELDS = dict(kind="", weight=1.0, train_split="", train_size=0, eval_split="", eval_size=0)
PARTS = ("train", "eval")


def _first(source: Any, size: int) -> Any:
    """The first `size` records of a random-access source (0 or more than it has: all of it)."""
    if not size or size >= len(source):
        return source
    import grain  # noqa: PLC0415  (keeps configs that import this module free of JAX)

    return (source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source))[:size]


def _parts(src: ml_collections.ConfigDict) -> dict[str, tuple[str, int]]:
    """{part: (split, size)} of the parts a source has (train always, eval when eval_split is set)."""
    return {p: (str(src[f"{p}_split"]), int(src[f"{p}_size"])) for p in PARTS if src[f"{p}_split"]}


# ----------------------------------------------------------------------------- the kinds
def _check_shapes_world(src, field: str) -> None:
    for part, (split, size) in _parts(src).items():
        if split not in shapes_world.SPLIT_CODES:
            raise ConfigError(f"{field}.{part}_split", f"unknown shapes_world split {split!r}; expected one of "
                                                      f"{tuple(shapes_world.SPLIT_CODES)}")
        if size < 1:
            raise ConfigError(f"{field}.{part}_size", f"shapes_world generates {part}_size records: must be >= 1, "
                                                     f"got {size}")


def _open_shapes_world(src, field: str, data_dir: epath.Path) -> dict[str, Any]:
    from glm5v_jax.data import shapes_world_tfds  # noqa: PLC0415  (tfds)

    del field
    parts = _parts(src)
    sizes = dict.fromkeys(shapes_world_tfds.SPLITS, 0)
    for split, size in parts.values():
        sizes[split] = max(sizes[split], size)
    t0 = time.time()
    path = shapes_world_tfds.build_shapes_world(str(data_dir), seed=int(src.build_seed), split_sizes=sizes)
    log.info("shapes world %s ready at %s (%.1f s)", {s: n for s, n in sizes.items() if n}, path, time.time() - t0)
    return {part: _first(shapes_world_tfds.load_split(path, split), size) for part, (split, size) in parts.items()}


def _check_tfds(src, field: str) -> None:
    if not src.name:
        raise ConfigError(f"{field}.name", "set the TFDS dataset name")


def _open_tfds(src, field: str, data_dir: epath.Path) -> dict[str, Any]:
    from glm5v_jax.data.sources import tfds_source  # noqa: PLC0415

    del field, data_dir
    tfds_dir = str(as_path(src.data_dir)) if src.data_dir else None
    return {part: _first(tfds_source(src.name, split, tfds_dir, image_key=src.image_key, text_key=src.text_key),
                         size) for part, (split, size) in _parts(src).items()}


def _check_array_record(src, field: str) -> None:
    from glm5v_jax.data.sources import PARSERS  # noqa: PLC0415

    if src.parse not in PARSERS:
        raise ConfigError(f"{field}.parse", f"unknown record format {src.parse!r}; expected one of {sorted(PARSERS)}")


def _open_array_record(src, field: str, data_dir: epath.Path) -> dict[str, Any]:
    from glm5v_jax.data.sources import UnreadableFilesError, array_record_source  # noqa: PLC0415

    del data_dir
    out = {}
    for part, (split, size) in _parts(src).items():
        files = expand_globs(split, f"{field}.{part}_split")
        try:
            records = array_record_source(files, parse=src.parse, skip_bad_files=bool(src.skip_bad_files))
        except UnreadableFilesError as e:
            raise ConfigError(f"{field}.{part}_split", f"{e}; remove them from the globs, or set "
                                                      f"{field}.skip_bad_files=True to train without them") from e
        out[part] = _first(records, size)
    return out


def _check_rl_tasks(src, field: str) -> None:
    from glm5v_jax.rl.tasks import GOLD  # noqa: PLC0415

    unknown = [f for f in str(src.families).split(",") if f and f not in GOLD]
    if unknown:
        raise ConfigError(f"{field}.families", f"{unknown} have no gold answers; expected among {sorted(GOLD)}")
    for part, (split, size) in _parts(src).items():
        if split not in RL_TASK_SPLITS or size < 1:
            raise ConfigError(f"{field}.{part}_split", f"rl_tasks parts are {tuple(RL_TASK_SPLITS)} with a "
                                                      f"{part}_size >= 1; got {split!r}, {size}")


def _open_rl_tasks(src, field: str, data_dir: epath.Path) -> dict[str, Any]:
    from glm5v_jax.rl.tasks import SFT_FAMILIES, GoldRecords  # noqa: PLC0415

    del field, data_dir
    families = [f for f in str(src.families).split(",") if f] or list(SFT_FAMILIES)
    return {part: GoldRecords(families, int(src.seed) + RL_TASK_SPLITS[split], size)
            for part, (split, size) in _parts(src).items()}


RL_TASK_SPLITS = {"train": 0, "validation": 1}  # seed offsets (RL trains on seed 0, evaluates on seed 1)


@dataclasses.dataclass(frozen=True)
class SourceKind:
    fields: Mapping[str, Any]  # the kind's own fields and their defaults (besides COMMON_FIELDS)
    check: Callable[[ml_collections.ConfigDict, str], None]  # (source, field) -> None or ConfigError
    open: Callable[[ml_collections.ConfigDict, str, epath.Path], dict[str, Any]]  # -> {part: records}


SOURCE_KINDS: dict[str, SourceKind] = {
    "shapes_world": SourceKind(dict(build_seed=0), _check_shapes_world, _open_shapes_world),
    "tfds": SourceKind(dict(name="", data_dir="", image_key="image", text_key="caption"), _check_tfds, _open_tfds),
    "array_record": SourceKind(dict(parse="tf_example", skip_bad_files=False), _check_array_record,
                               _open_array_record),
    "rl_tasks": SourceKind(dict(families="", seed=2), _check_rl_tasks, _open_rl_tasks),
}


# ----------------------------------------------------------------------------- config blocks
def source_config(kind: str, **fields: Any) -> ml_collections.ConfigDict:
    """A `config.data.sources.<name>` entry of `kind` with every field at its default but `fields`."""
    if kind not in SOURCE_KINDS:
        raise ConfigError("kind", f"unknown source kind {kind!r}; expected one of {tuple(SOURCE_KINDS)}")
    block = {**COMMON_FIELDS, "kind": kind, **SOURCE_KINDS[kind].fields}
    unknown = sorted(set(fields) - set(block))
    if unknown:
        raise ConfigError(f"{kind}.{unknown[0]}", f"not a field of a {kind} source; its fields are {sorted(block)}")
    block.update(fields)
    return ml_collections.ConfigDict(block)


def check_source(src: Any, field: str) -> ml_collections.ConfigDict:
    """`src` with every field of its kind (defaults filled in), checked; ConfigError naming the field."""
    if not isinstance(src, (Mapping, ml_collections.ConfigDict)) or "kind" not in src:
        raise ConfigError(field, "expected a source block with a `kind` (glm5v_jax.data.source_registry."
                                 "source_config)")
    given = src.to_dict() if isinstance(src, ml_collections.ConfigDict) else dict(src)
    if given["kind"] not in SOURCE_KINDS:
        raise ConfigError(f"{field}.kind", f"unknown source kind {given['kind']!r}; expected one of "
                                           f"{tuple(SOURCE_KINDS)}")
    kind = SOURCE_KINDS[given["kind"]]
    unknown = sorted(set(given) - set(COMMON_FIELDS) - set(kind.fields))
    if unknown:
        raise ConfigError(f"{field}.{unknown[0]}", f"not a field of a {given['kind']} source; its fields are "
                                                   f"{sorted(set(COMMON_FIELDS) | set(kind.fields))}")
    src = ml_collections.ConfigDict({**COMMON_FIELDS, **kind.fields, **given})
    if float(src.weight) < 0:
        raise ConfigError(f"{field}.weight", f"must be >= 0, got {src.weight}")
    if not src.train_split:
        what = "comma-separated globs of record files" if src.kind == "array_record" else "a split name"
        raise ConfigError(f"{field}.train_split", f"a source needs a training part: {what}")
    for part in PARTS:
        if int(src[f"{part}_size"]) < 0:
            raise ConfigError(f"{field}.{part}_size", f"must be >= 0 (0: all), got {src[f'{part}_size']}")
    kind.check(src, field)
    return src


# ----------------------------------------------------------------------------- opening
def data_dir_of(data: ml_collections.ConfigDict, workdir: Any) -> epath.Path:
    """config.data.data_dir, or `<workdir>/data` when it is empty."""
    return as_path(data.data_dir) if data.get("data_dir", "") else as_path(workdir) / "data"


def open_source(src: Any, field: str, data_dir: epath.Path) -> dict[str, Any]:
    """{part: random-access records} of one source block (checked first)."""
    src = check_source(src, field)
    return SOURCE_KINDS[src.kind].open(src, field, epath.Path(data_dir))


@dataclasses.dataclass
class DataSources:
    train: dict[str, Any]  # each source's training records, unmixed and untagged, in config order
    eval: dict[str, Any]  # the evaluation records of the sources that have an eval_split
    weights: dict[str, float]

    def mixture(self, part: str = "train", seed: int = 0):
        """The sources of `part` mixed by weight (`glm5v_jax.data.sources.mix_sources`: each shuffled
        and repeated, record ids prefixed with the source name)."""
        from glm5v_jax.data.sources import mix_sources  # noqa: PLC0415

        named = getattr(self, part)
        return mix_sources(named, {k: self.weights[k] for k in named}, seed)


def checked_sources(data: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """Every `config.data.sources` entry checked, with its defaults; nothing is opened."""
    field = "config.data.sources"
    if not data.get("sources"):
        raise ConfigError(field, "give at least one named source, e.g. config.data.sources.<name> = "
                                 "source_config('shapes_world', ...)")
    out = {name: check_source(src, f"{field}.{name}") for name, src in data.sources.items()}
    if sum(float(s.weight) for s in out.values()) <= 0:
        raise ConfigError(field, "every weight is 0; at least one source must have a positive weight")
    return out


def open_sources(data: ml_collections.ConfigDict, workdir: Any) -> DataSources:
    """Every `config.data.sources` entry, checked (all of them before any is built), then opened;
    shapes-world sources are generated on first use under `data_dir_of(data, workdir)`."""
    sources, data_dir = checked_sources(data), data_dir_of(data, workdir)
    train, evals = {}, {}
    for name, src in sources.items():
        parts = SOURCE_KINDS[src.kind].open(src, f"config.data.sources.{name}", data_dir)
        train[name] = parts["train"]
        if "eval" in parts:
            evals[name] = parts["eval"]
    return DataSources(train, evals, {name: float(src.weight) for name, src in sources.items()})


# ----------------------------------------------------------------------------- the tokenizer
def tokenizer_texts(data: ml_collections.ConfigDict) -> list[tuple[int, str, int]]:
    """(build seed, split, records) whose texts train the tokenizer: the training parts of the
    shapes-world sources named in `config.data.tokenizer_sources` (every shapes-world source when
    empty), at most `config.data.tokenizer_max_records` records each (0: all), ordered by seed and
    split (images before text-only documents)."""
    sources, field = checked_sources(data), "config.data.tokenizer_sources"
    names = [n.strip() for n in str(data.get("tokenizer_sources", "")).split(",") if n.strip()]
    for name in names:
        if name not in sources:
            raise ConfigError(field, f"{name!r} is not in config.data.sources ({sorted(sources)})")
        if sources[name].kind != "shapes_world":
            raise ConfigError(field, f"{name!r} is a {sources[name].kind} source; the tokenizer trains on "
                                     "shapes_world texts only (or set config.data.tokenizer)")
    cap = int(data.get("tokenizer_max_records", 0))
    wanted: dict[tuple[int, str], int] = {}
    for name in names or [n for n, s in sources.items() if s.kind == "shapes_world"]:
        src = sources[name]
        key, size = (int(src.build_seed), str(src.train_split)), int(src.train_size)
        wanted[key] = max(wanted.get(key, 0), min(size, cap) if cap else size)
    order = list(shapes_world.SPLIT_CODES)
    return [(seed, split, n) for (seed, split), n in sorted(wanted.items(), key=lambda kv: (kv[0][0],
                                                                                          order.index(kv[0][1])))]


def tokenizer_from_config(data: ml_collections.ConfigDict, workdir: Any) -> Tokenizer:
    """`config.data.tokenizer` (a SentencePiece model path, local or gs://), or a model of
    `config.data.tokenizer_vocab_size` pieces trained on `tokenizer_texts(data)`, cached in the data
    directory as `tokenizer_v<vocab>_s<seed>-<split>-<records>[_...].model`."""
    if data.get("tokenizer", ""):
        return Tokenizer(as_path(data.tokenizer))
    texts = tokenizer_texts(data)
    if not texts:
        raise ConfigError("config.data.tokenizer", "no shapes_world source to train a tokenizer on; give the path "
                                                   "of a SentencePiece model with the GLM special tokens (see "
                                                   "glm5v_jax.data.tokenizer.train_tokenizer)")
    vocab = int(data.tokenizer_vocab_size)
    name = f"tokenizer_v{vocab}_" + "_".join(f"s{seed}-{split}-{n}" for seed, split, n in texts) + ".model"
    path = data_dir_of(data, workdir) / name
    if path.exists():
        return Tokenizer(path)
    t0 = time.time()
    lines = (text for seed, split, n in texts for text in shapes_world.iter_split_texts(seed, split, n))
    tokenizer = train_tokenizer(lines, path, vocab_size=vocab)
    log.info("trained tokenizer %s (%d pieces) in %.1f s", path, tokenizer.vocab_size, time.time() - t0)
    return tokenizer
