"""A real two-process run (jax.distributed on CPU): each process builds the whole batch and
`global_batch` puts each block on the right devices of the 8-device, 2-process mesh, with the
rows over fsdp and, where a step has fewer rows than batch shards, the tokens over context."""

import socket
import subprocess
import sys

from lima_jax.data import demo

WORKER = r'''
import os
import sys
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import dataclasses
import jax, ml_collections, numpy as np
pid, port, tok = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
from lima_jax.config import base_config
from lima_jax.data import demo, pipeline as P
from lima_jax.sharding import make_mesh
c = base_config().data
c.update(train_path=demo.DEMO_TRAIN, tokenizer_path=tok, seq_len=128, dev_size=20, examples_per_step=16)
data = P.load_data(c, 0); plan = P.make_plan(data, c.examples_per_step, 1)
for context in (1, 4):  # rows over 8 fsdp devices; rows over 2, each row's tokens over 4
    mesh = make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=8, tensor=1)), context=context)
    shards = 8 // context
    rows = -(-plan.rows_needed // shards) * shards
    full = next(P.train_iterator(data, dataclasses.replace(plan, rows_per_step=rows)))
    arr = P.global_batch(full, mesh)
    for k, v in arr.items():
        assert v.shape == full[k].shape, (k, v.shape)
        for shard in v.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), full[k][shard.index])
print("ok", pid, len(v.addressable_shards))
'''


def test_two_process_global_batch(tmp_path):
    tok = demo.build_demo_tokenizer(str(tmp_path))
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i), port, tok], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"ok {i} 4" in out, out[-3000:]
