"""Sharded loss and gradients equal the single-device result; configs that cannot fit fail early."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding

from lima_jax.config import base_config, validate
from lima_jax.model import init_params, param_logical_axes
from lima_jax.sharding import logical_to_spec, make_mesh, named_shardings
from lima_jax.train.loss import lm_loss
from tests.train_fixtures import CFG, random_batch

jax.config.update("jax_default_matmul_precision", "highest")

def loss_and_grads(params, batch):
    return jax.value_and_grad(lambda p: lm_loss(CFG, p, batch)[0])(params)


@pytest.fixture(scope="module")
def reference():
    params = init_params(CFG, jax.random.key(0))
    batch = random_batch()
    device = jax.devices()[0]
    loss, grads = jax.jit(loss_and_grads)(jax.device_put(params, device), jax.device_put(batch, device))
    return params, batch, loss, grads


@pytest.mark.parametrize("shape, context", [((8, 1, 1), 1), ((1, 8, 1), 1), ((2, 2, 2), 1),
                                            ((1, 8, 1), 8), ((1, 8, 1), 2), ((2, 2, 2), 2)])
def test_sharded_loss_and_grads_equal_single_device(shape, context, reference):
    """Rows over data and fsdp, heads over tensor, and (context > 1) each row's tokens over
    `context` of the fsdp devices: the single-device loss and gradients."""
    params, batch, ref_loss, ref_grads = reference
    mesh = make_mesh(ml_collections.ConfigDict(dict(zip(("data", "fsdp", "tensor"), shape))), context=context)
    p_shard = named_shardings(param_logical_axes(CFG), mesh)
    b_shard = NamedSharding(mesh, logical_to_spec(("batch", "length")))
    with jax.set_mesh(mesh):
        step = jax.jit(loss_and_grads, in_shardings=(p_shard, b_shard), out_shardings=(None, p_shard))
        loss, grads = step(jax.device_put(params, p_shard), jax.device_put(batch, b_shard))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref_grads)

    wq = grads["layers"]["attn"]["wq"]  # [layers, embed, heads, head_dim]
    _, fsdp, tensor = shape
    assert wq.sharding.shard_shape(wq.shape) == (2, 64 // fsdp, 4 // tensor, 16)
    emb = grads["embed"]
    assert emb.sharding.shard_shape(emb.shape) == (256 // tensor, 64 // fsdp)


def test_mesh_that_does_not_match_devices_names_the_keys():
    c = base_config()
    c.mesh.update(data=2, fsdp=2, tensor=1)
    with pytest.raises(ValueError, match=r"config\.mesh\.data=2.*multiply to 4.*8 devices"):
        validate(c, 8)
    c.mesh.update(data=3, fsdp=-1)
    with pytest.raises(ValueError, match=r"do not divide"):
        validate(c, 8)


def test_heads_not_divisible_by_tensor_names_the_key():
    c = base_config()
    c.model.update(n_heads=6, n_kv_heads=6, dim=384)
    c.mesh.update(fsdp=-1, tensor=4)
    with pytest.raises(ValueError, match=r"config\.model\.n_heads=6 is not divisible by the tensor-parallel size 4"):
        validate(c, 8)


def test_attention_kernel_limits_name_the_keys():
    c = base_config()
    c.model.update(attention="splash")
    c.data.seq_len = 200
    with pytest.raises(ValueError, match=r"config\.model\.attention='splash' .*seq_len=200"):
        validate(c, 8)
    c.model.update(attention="cudnn", dtype="float32")
    with pytest.raises(ValueError, match=r"config\.model\.attention='cudnn' .*config\.model\.dtype='float32'"):
        validate(c, 8)


def test_fill_axis_takes_the_remaining_devices():
    c = base_config()
    c.mesh.update(data=2, fsdp=-1, tensor=2)
    assert make_mesh(c.mesh).shape == {"data": 2, "fsdp": 2, "context": 1, "tensor": 2}
