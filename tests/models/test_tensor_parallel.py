"""Real tensor parallelism: two gloo CPU processes load one checkpoint and must match HF."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import torch

WORKER = textwrap.dedent('''
    import sys
    import torch
    import torch.distributed as dist
    from infer.models import load_model
    from infer.runtime.attention import Attention, AttentionMetadata, forward_context

    folder, out, block_size = sys.argv[1], sys.argv[2], 4
    dist.init_process_group("gloo")
    model, config = load_model(folder)
    for m in model.modules():
        if isinstance(m, Attention):
            m.bind_kv_cache(torch.zeros(2, 16, block_size, m.num_kv_heads, m.head_dim))
    seqs = [[3, 1, 4, 1, 5, 9, 2], [6, 5, 254]]
    tables = [[0, 1], [2]]
    md = AttentionMetadata.build(query_lens=[7, 3], seq_lens=[7, 3], block_tables=tables, block_size=block_size)
    with torch.inference_mode(), forward_context(md):
        hidden = model(torch.tensor(seqs[0] + seqs[1]), torch.tensor(list(range(7)) + list(range(3))))
        logits = model.compute_logits(hidden)
    heads = model.model.layers[0].self_attn.num_heads
    torch.save({"logits": logits, "heads": heads}, f"{out}.{dist.get_rank()}")
    dist.barrier()  # both ranks done before either tears gloo down (a racing teardown aborted once)
    dist.destroy_process_group()
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_prefill_matches_hf(hf_checkpoint, hf_logits, tmp_path):
    hf_model, folder = hf_checkpoint("qwen3", vocab_size=255)  # 255 rows: the last rank is padded
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, str(script), str(folder), str(tmp_path / "out")],
                         env=dict(env, RANK=str(rank)), stderr=subprocess.PIPE, text=True)
        for rank in range(2)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    for p, err in zip(procs, errors):
        assert p.returncode == 0, err[-3000:]

    expected = torch.cat([hf_logits(hf_model, [3, 1, 4, 1, 5, 9, 2]), hf_logits(hf_model, [6, 5, 254])])
    for rank in range(2):
        result = torch.load(tmp_path / f"out.{rank}")
        assert result["heads"] == 2  # 4 q heads split over 2 ranks
        torch.testing.assert_close(result["logits"], expected, atol=1e-5, rtol=1e-4)
