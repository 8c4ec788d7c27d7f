"""config.data.sources through the one source registry (glm5v_jax.data.source_registry): real corpora
through TFDS names or ArrayRecord globs, mixtures of kinds, refusals that name the field, and the one
tokenizer-from-config with its cache path."""
from __future__ import annotations

import io
import json

import ml_collections
import numpy as np
import pytest
from PIL import Image

from glm5v_jax.data import shapes_world
from glm5v_jax.data.batch import validate_vlm_batch
from glm5v_jax.data.source_registry import (SOURCE_KINDS, check_source, open_sources, source_config,
                                            tokenizer_from_config, tokenizer_texts)
from glm5v_jax.data.tokenizer import train_tokenizer
from glm5v_jax.errors import ConfigError
from glm5v_jax.models.build import vlm_spec_from_config
from glm5v_jax.train.vlm_pretrain import make_iterator, prepare_data, resolve_model_config

from helpers import config_module

vlm_pretrain = config_module("vlm_pretrain")


def _png(h, w, k):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (40 * k % 255, 90, 200)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    texts = [f"a photo of {k} red circles and {k + 1} blue squares number {k}" for k in range(300)]
    train_tokenizer(texts, str(path), vocab_size=600)
    return str(path)


def _config(tokenizer_path, data="shapes_world", **fields):
    """configs/vlm_pretrain.py:tiny,data=<data> with `fields` ("a.b": value under config.data) set."""
    cfg = vlm_pretrain.get_config(f"tiny,data={data}")
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.data.tokenizer = tokenizer_path
    cfg.data.batch_size, cfg.data.seq_len = 2, 128
    for key, value in fields.items():
        node = cfg.data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def _first_batch(cfg, tmp_path):
    sources, weights, tok = prepare_data(cfg.data, tmp_path)
    spec = vlm_spec_from_config(resolve_model_config(cfg, tok).model)
    it = make_iterator(cfg.data, sources["train"], weights, tok, spec, seed=0, train=True)
    batch = next(it)
    validate_vlm_batch(batch, image_token_id=tok.image_id, vocab_size=tok.padded_vocab_size)
    assert batch["image_valid"].any()
    return sources, batch


def _write_records(path, n, caption="red circles"):
    from array_record.python.array_record_module import ArrayRecordWriter
    from tensorflow_datasets.proto import tf_example_pb2

    w = ArrayRecordWriter(str(path), "group_size:1")
    for k in range(n):
        ex = tf_example_pb2.Example()
        for key, value in dict(image=_png(32, 32, k), kind=b"image", caption_en=f"{k} {caption}".encode(),
                               width=32, height=32).items():
            f = ex.features.feature[key]
            (f.int64_list if isinstance(value, int) else f.bytes_list).value.append(value)
        w.write(ex.SerializeToString())
    w.close()


def test_tfds_corpus(tmp_path, tokenizer_path):
    import tensorflow_datasets as tfds

    with tfds.core.registered.skip_registration():
        class TinyCaptions(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "jpg": tfds.features.Tensor(shape=(), dtype=np.object_), "text": tfds.features.Text()}))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples(6), "validation": self._generate_examples(2)}

            def _generate_examples(self, n):
                for k in range(n):
                    yield k, {"jpg": _png(48, 64, k), "text": f"a photo of {k} red circles"}

        TinyCaptions(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    cfg = _config(tokenizer_path, "tfds", **{"sources.corpus.name": "tiny_captions",
                                             "sources.corpus.data_dir": str(tmp_path),
                                             "sources.corpus.image_key": "jpg", "sources.corpus.text_key": "text",
                                             "sources.corpus.train_size": 4})
    sources, _ = _first_batch(cfg, tmp_path)
    assert len(sources["train"]["corpus"]) == 4 and len(sources["eval"]["corpus"]) == 2  # train_size: the first 4


def test_array_record_corpus_with_wildcards_in_several_components(tmp_path, tokenizer_path):
    for shard in ("a", "b"):
        (tmp_path / f"shard_{shard}").mkdir()
        _write_records(tmp_path / f"shard_{shard}" / "train-0.array_record", 4)
    _write_records(tmp_path / "eval-0.array_record", 2)
    cfg = _config(tokenizer_path, "array_record",
                  **{"sources.corpus.train_split": str(tmp_path / "shard_*" / "train-*.array_record"),
                     "sources.corpus.eval_split": str(tmp_path / "eval-*.array_record")})
    sources, _ = _first_batch(cfg, tmp_path)
    assert len(sources["train"]["corpus"]) == 8 and len(sources["eval"]["corpus"]) == 2


def test_a_mixture_of_kinds(tmp_path):
    """A shapes-world source and an ArrayRecord one in one mixture, by weight; eval parts where given."""
    _write_records(tmp_path / "extra.array_record", 10, caption="blue squares")
    data = ml_collections.ConfigDict(dict(data_dir=str(tmp_path / "data"), sources=dict(
        world=source_config("shapes_world", weight=3.0, build_seed=0, train_split="train", train_size=12,
                            eval_split="single_object_validation", eval_size=4),
        extra=source_config("array_record", weight=1.0, train_split=str(tmp_path / "*.array_record")))))
    opened = open_sources(data, tmp_path)
    assert {k: len(v) for k, v in opened.train.items()} == {"extra": 10, "world": 12}
    assert list(opened.eval) == ["world"] and opened.weights == {"extra": 1.0, "world": 3.0}
    mixed = opened.mixture("train", seed=0)
    ids = [str(mixed[i]["id"]) for i in range(len(mixed))]
    share = sum(i.startswith("world/") for i in ids) / len(ids)
    assert 0.6 < share < 0.9, share  # 0.75 by weight
    for rec in opened.eval["world"]:  # the single-object split: one box per image
        assert len(json.loads(rec["boxes_json"])) == 1


def test_bad_data_settings_name_the_field(tmp_path, tokenizer_path):
    def refused(field, cfg=None, data=None):
        with pytest.raises(ConfigError) as info:
            if data is None:
                prepare_data(cfg.data, tmp_path)
            else:
                open_sources(data, tmp_path)
        assert info.value.field == field, str(info.value)

    refused("config.data.sources.image.kind", _config(tokenizer_path, **{"sources.image.kind": "laion"}))
    refused("config.data.sources.image.weight", _config(tokenizer_path, **{"sources.image.weight": -0.5}))
    refused("config.data.sources.image.train_split",
            _config(tokenizer_path, **{"sources.image.train_split": "training"}))
    refused("config.data.sources.text.train_size", _config(tokenizer_path, **{"sources.text.train_size": 0}))
    refused("config.data.sources.corpus.name", _config(tokenizer_path, "tfds"))
    refused("config.data.sources.corpus.train_split", _config(tokenizer_path, "array_record"))  # no globs given
    refused("config.data.sources.corpus.train_split",
            _config(tokenizer_path, "array_record", **{"sources.corpus.train_split": str(tmp_path / "none-*")}))
    refused("config.data.sources.corpus.parse", _config(tokenizer_path, "array_record",
                                                        **{"sources.corpus.parse": "csv",
                                                           "sources.corpus.train_split": "x-*"}))
    # the old schema's fields are refused, not ignored
    old = ml_collections.ConfigDict(dict(data_dir="", sources=dict(natural=dict(kind="shapes_world", train=24,
                                                                                 weight=1.0))))
    refused("config.data.sources.natural.train", data=old)
    refused("config.data.sources", data=ml_collections.ConfigDict(dict(data_dir="", sources={})))
    zero = ml_collections.ConfigDict(dict(data_dir="", sources=dict(a=source_config(
        "shapes_world", weight=0.0, train_split="train", train_size=2))))
    refused("config.data.sources", data=zero)
    with pytest.raises(ConfigError, match="option data"):
        vlm_pretrain.get_config("tiny,data=laion")

    # the tokenizer: a real corpus needs one; tokenizer_sources must name shapes-world sources
    tfds_cfg = _config("", "tfds", **{"sources.corpus.name": "x"})
    with pytest.raises(ConfigError) as info:
        tokenizer_from_config(tfds_cfg.data, tmp_path)
    assert info.value.field == "config.data.tokenizer"
    with pytest.raises(ConfigError) as info:
        tokenizer_texts(_config("", **{"tokenizer_sources": "image,natural"}).data)
    assert info.value.field == "config.data.tokenizer_sources"
    assert set(SOURCE_KINDS) == {"shapes_world", "tfds", "array_record", "rl_tasks"}
    for fields, field in ((dict(families="tools/tiny_word"), "families"), (dict(train_split="test"), "train_split")):
        rl = source_config("rl_tasks", **{"train_split": "train", "train_size": 4, **fields})
        with pytest.raises(ConfigError) as info:
            check_source(rl, "config.data.sources.rl")
        assert info.value.field == f"config.data.sources.rl.{field}", str(info.value)


def test_tokenizer_from_config_is_the_old_one_and_cached_by_what_it_was_trained_on(tmp_path):
    """Trained on the shapes-world sources' training texts (images before documents, by seed), cached
    under a name that says so; the bytes equal a model trained on `shapes_world.iter_texts` (what
    the VLM stage trained before the registry)."""
    cfg = _config("", **{"sources.image.train_size": 20, "sources.text.train_size": 10, "tokenizer_vocab_size": 600,
                         "data_dir": str(tmp_path / "data")})
    assert tokenizer_texts(cfg.data) == [(0, "train", 20), (0, "text_train", 10)]
    tok = tokenizer_from_config(cfg.data, tmp_path)
    path = tmp_path / "data" / "tokenizer_v600_s0-train-20_s0-text_train-10.model"
    assert path.exists() and tok.name == str(path)
    old = train_tokenizer(shapes_world.iter_texts(0, {"train": 20, "text_train": 10}), tmp_path / "old.model",
                          vocab_size=600)
    assert old.serialized_model_proto == tok.serialized_model_proto
    path.write_bytes(old.serialized_model_proto)  # cached: read back, not trained again
    assert tokenizer_from_config(cfg.data, tmp_path).serialized_model_proto == old.serialized_model_proto

    cfg.data.tokenizer_sources, cfg.data.tokenizer_max_records = "image", 8  # another text set, another file
    assert tokenizer_texts(cfg.data) == [(0, "train", 8)]
    tokenizer_from_config(cfg.data, tmp_path)
    assert (tmp_path / "data" / "tokenizer_v600_s0-train-8.model").exists()
    cfg.data.tokenizer = str(path)  # an explicit model wins
    assert tokenizer_from_config(cfg.data, tmp_path).name == str(path)
