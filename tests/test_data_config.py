"""The trainer's data section: real corpora through TFDS names or ArrayRecord paths."""
from __future__ import annotations

import io

import ml_collections
import numpy as np
import pytest
from PIL import Image

from glm5v_jax.data.batch import validate_vlm_batch
from glm5v_jax.data.tokenizer import train_tokenizer
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


def _config(tokenizer_path, **data):
    cfg = vlm_pretrain.get_config("tiny")
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.data.tokenizer = tokenizer_path
    cfg.data.batch_size, cfg.data.seq_len = 2, 128
    for key, value in data.items():
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
    return batch


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
    cfg = _config(tokenizer_path, dataset="tfds", **{"tfds.name": "tiny_captions", "tfds.data_dir": str(tmp_path),
                                                     "tfds.image_key": "jpg", "tfds.text_key": "text"})
    _first_batch(cfg, tmp_path)


def test_array_record_corpus(tmp_path, tokenizer_path):
    from array_record.python.array_record_module import ArrayRecordWriter
    from tensorflow_datasets.proto import tf_example_pb2

    def write(path, n):
        w = ArrayRecordWriter(str(path), "group_size:1")
        for k in range(n):
            ex = tf_example_pb2.Example()
            for key, value in dict(image=_png(32, 32, k), kind=b"image", caption_en=f"{k} red circles".encode(),
                                   width=32, height=32).items():
                f = ex.features.feature[key]
                (f.int64_list if isinstance(value, int) else f.bytes_list).value.append(value)
            w.write(ex.SerializeToString())
        w.close()

    write(tmp_path / "train-0.array_record", 4)
    write(tmp_path / "train-1.array_record", 4)
    write(tmp_path / "eval-0.array_record", 2)
    cfg = _config(tokenizer_path, dataset="array_record",
                  **{"array_record.train_paths": str(tmp_path / "train-*.array_record"),
                     "array_record.eval_paths": str(tmp_path / "eval-*.array_record")})
    _first_batch(cfg, tmp_path)


def test_bad_data_settings_name_the_field(tmp_path, tokenizer_path):
    with pytest.raises(ValueError, match="config.data.dataset"):
        prepare_data(_config(tokenizer_path, dataset="laion").data, tmp_path)
    with pytest.raises(ValueError, match="config.data.tokenizer"):
        prepare_data(_config("", dataset="tfds").data, tmp_path)
    with pytest.raises(ValueError, match="config.data.tfds.name"):
        prepare_data(_config(tokenizer_path, dataset="tfds").data, tmp_path)
    with pytest.raises(ValueError, match="config.data.array_record.train_paths"):
        prepare_data(_config(tokenizer_path, dataset="array_record",
                             **{"array_record.train_paths": str(tmp_path / "none-*")}).data, tmp_path)
