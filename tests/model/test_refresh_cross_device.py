"""AsyncKeyRefresher with the memory on another GPU than the encoder (issue 13 #5).

The shadow tables live on the memory's GPU; their allocation and fill used to run on that
GPU's current stream in the worker thread, which neither the refresh's done event nor the
swap's wait covered: a training thread on its own stream there could read the table
before it was written. Now that work runs on a stream of the memory's GPU which the done
event waits for. Needs two CUDA devices (gpu-marked; skipped elsewhere).
"""
from __future__ import annotations

import pytest
import torch

from pluglm.refresh import AsyncKeyRefresher, snapshot_encoder
from test_refresh import make_memory, perturb_, rel_err, sync_encode, tiny_pluglm

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]


@pytest.mark.parametrize("training_stream", ["default", "side"])
def test_memory_on_another_gpu_is_complete_at_the_swap(training_stream):
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    vocab, L, M = 500, 64, 50_001
    enc_dev, mem_dev = torch.device("cuda:0"), torch.device("cuda:1")
    torch.cuda.set_device(enc_dev)
    model = tiny_pluglm(vocab, d=64, L=L, device=enc_dev)
    mem = make_memory(M, L, vocab, device=mem_dev)
    side = torch.cuda.Stream(device=mem_dev)
    prev = torch.cuda.current_stream(mem_dev)
    if training_stream == "side":
        with torch.cuda.device(mem_dev):
            torch.cuda.set_stream(side)  # the training thread's stream on the memory GPU
    try:
        old = snapshot_encoder(model)
        ref_k, ref_v = sync_encode(old, mem.to(enc_dev))
        busy = torch.randn(4096, 4096, device=mem_dev)
        with AsyncKeyRefresher(model, mem, interval=0, chunk=4096) as r:
            # keep the memory GPU's default stream busy: work left there runs late
            with torch.cuda.stream(torch.cuda.default_stream(mem_dev)):
                for _ in range(20):
                    busy = busy @ busy / 64.0
            r.refresh_now()
            assert r._job.mem_stream is not None and r._job.mem_stream.device == mem_dev
            perturb_(model)
            assert r.wait() == M
        keys = mem.keys.to("cpu")  # read on the training thread's stream of the memory GPU
        values = mem.values.to("cpu")
    finally:
        with torch.cuda.device(mem_dev):
            torch.cuda.set_stream(prev)
    assert mem.keys.device == mem_dev
    assert rel_err(keys, ref_k) <= 1e-4 and rel_err(values, ref_v) <= 1e-4
