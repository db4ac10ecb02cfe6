"""The converter's streaming contract: one layer's tensor at a time in both directions, and a
checkpoint layout that plain Orbax restores (parity with transformers is in test_convert.py)."""

import jax
import numpy as np
import pytest

from lima_jax import checkpoint, model_store
from lima_jax.convert import convert_to_orbax, export_hf, sources
from lima_jax.convert.layout import get_path, layout, params_from_hf
from lima_jax.model import ModelConfig, abstract_params
from tests.convert_fixtures import CONVERT_MHA as MHA, read_safetensors, write_meta
from tests.references import hf_model


@pytest.fixture(scope="module")
def model():
    return hf_model(MHA, seed=3)


@pytest.fixture(scope="module")
def state_dict(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def largest_tensor_bytes(cfg: ModelConfig) -> int:
    """The biggest single tensor of our layout: one layer of a stacked leaf, or a whole other leaf."""
    abstract = abstract_params(cfg)
    sizes = []
    for t in layout(cfg):
        a = get_path(abstract, t.path)
        shape = a.shape[1:] if t.per_layer else a.shape
        sizes.append(int(np.prod(shape)) * np.dtype(a.dtype).itemsize)
    return max(sizes)


def test_conversion_and_export_move_one_layer_at_a_time(tmp_path, model, monkeypatch):
    src = write_meta(model, MHA, tmp_path / "meta", 2)
    seen = []
    original_save = checkpoint.save_params_streaming

    def spy_save(directory, leaves, meta, **kw):
        def watched():
            for path, spec, slices in leaves:
                def each(path=path, slices=slices):
                    for index, value in slices:
                        seen.append((path, index, value.nbytes))
                        yield index, value
                yield path, spec, each()
        return original_save(directory, watched(), meta, **kw)

    monkeypatch.setattr(checkpoint, "save_params_streaming", spy_save)
    convert_to_orbax("meta", src, tmp_path / "ckpt", vocab_multiple=MHA.vocab_multiple)
    for t in layout(MHA):
        indices = [i for p, i, _ in seen if p == t.path]
        assert indices == (list(range(MHA.n_layers)) if t.per_layer else [None]), t.path
    assert max(n for *_, n in seen) <= largest_tensor_bytes(MHA)

    reads = []
    original_read = checkpoint.ParamsReader.read

    def spy_read(self, path, index=None):
        w = original_read(self, path, index)
        reads.append((path, index, w.nbytes))
        return w

    monkeypatch.setattr(checkpoint.ParamsReader, "read", spy_read)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    for t in layout(MHA):
        indices = sorted((i for p, i, _ in reads if p == t.path), key=str)
        assert indices == (list(range(MHA.n_layers)) if t.per_layer else [None]), t.path
    assert max(n for *_, n in reads) <= largest_tensor_bytes(MHA)
    exported = read_safetensors(tmp_path / "hf")
    model_sd = model.state_dict()
    for name, w in exported.items():
        np.testing.assert_allclose(w, model_sd[name].numpy(), atol=1e-6, rtol=0, err_msg=name)


def test_stacked_leaves_are_chunked_within_a_layer_and_restore_with_orbax(tmp_path, model, state_dict):
    model.save_pretrained(tmp_path / "hf")
    convert_to_orbax("hf", tmp_path / "hf", tmp_path / "ckpt", vocab_multiple=MHA.vocab_multiple)
    reader = checkpoint.ParamsReader(tmp_path / "ckpt")
    assert reader.use_zarr3 and reader.use_ocdbt
    expected = params_from_hf(state_dict, MHA)
    for t in layout(MHA):
        array = reader.array(t.path)
        if t.per_layer:
            assert array.chunk_layout.write_chunk.shape[0] == 1, t.path  # one layer per write, per chunk
        np.testing.assert_array_equal(reader.read(t.path), get_path(expected, t.path), err_msg=str(t.path))
    # Orbax's own reader: a full StandardRestore on one device
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = checkpoint.restore_params(tmp_path / "ckpt", abstract_params(MHA),
                                       jax.tree.map(lambda _: one, abstract_params(MHA)))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, expected)


def test_export_reads_a_trainer_written_checkpoint(tmp_path, state_dict):
    """Checkpoints the trainer writes (Orbax StandardSave: zarr2, per-process OCDBT) export too."""
    model_store.save_params(tmp_path / "ckpt", params_from_hf(state_dict, MHA), model_store.CheckpointMeta(model=MHA))
    assert not checkpoint.ParamsReader(tmp_path / "ckpt").use_zarr3
    export_hf(tmp_path / "ckpt", tmp_path / "hf", max_shard_bytes=50_000)
    exported = read_safetensors(tmp_path / "hf")
    assert sorted(exported) == sorted(state_dict)
    for name, w in state_dict.items():
        assert exported[name].tobytes() == w.tobytes(), name


def test_meta_source_without_page_out_reopens_and_converts_the_same(tmp_path, model, monkeypatch):
    src = write_meta(model, MHA, tmp_path / "meta", 2)
    convert_to_orbax("meta", src, tmp_path / "a", vocab_multiple=MHA.vocab_multiple)
    opened = []
    original = sources.MetaSource._open_files
    monkeypatch.setattr(sources, "_page_out", lambda start, end: False)  # a kernel without MADV_PAGEOUT
    monkeypatch.setattr(sources.MetaSource, "_open_files", lambda self: opened.append(1) or original(self))
    convert_to_orbax("meta", src, tmp_path / "b", vocab_multiple=MHA.vocab_multiple)
    assert len(opened) > len(layout(MHA))  # fresh maps per tensor instead of released pages
    a, b = checkpoint.ParamsReader(tmp_path / "a"), checkpoint.ParamsReader(tmp_path / "b")
    for t in layout(MHA):
        np.testing.assert_array_equal(a.read(t.path), b.read(t.path), err_msg=str(t.path))


def test_streaming_writer_refuses_missing_or_repeated_layers(tmp_path):
    spec = jax.ShapeDtypeStruct((3, 2, 2), np.float32)
    layer = np.ones((2, 2), np.float32)
    for slices, message in (([(0, layer), (2, layer)], r"never written: layer\(s\) \[1\]"),
                            ([(0, layer), (1, layer), (1, layer), (2, layer)], "written twice"),
                            ([(0, layer), (5, layer)], "expected None or a layer"),
                            ([(0, np.ones((2, 3), np.float32))], "expected")):
        with pytest.raises(ValueError, match=message):
            checkpoint.save_params_streaming(tmp_path / "ckpt", [(("w",), spec, iter(slices))], {})
        assert not any(tmp_path.iterdir())  # nothing left behind
