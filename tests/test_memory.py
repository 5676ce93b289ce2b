"""Loading streams tensors: peak memory stays below 1.5x the checkpoint size."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

import camelid
from camelid import ModelConfig, Transformer

PROBE = textwrap.dedent(
    """
    import sys, torch, camelid

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    torch.set_num_threads(1)
    camelid.load(sys.argv[1])  # warm up imports and allocator on a small load first
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS counter
    before = status("VmRSS")
    model = camelid.load(sys.argv[2])
    print(status("VmHWM") - before)
    """
)


def test_peak_rss_while_loading(tmp_path):
    # Many mid-sized tensors, as in a real checkpoint (the largest, the embedding, is 6%).
    config = ModelConfig(vocab_size=8000, dim=512, n_layers=12, n_heads=8, ffn_hidden_dim=1536)
    torch.manual_seed(0)
    camelid.save(Transformer(config), tmp_path / "big")  # ~210 MB in fp32
    camelid.save(Transformer(ModelConfig.from_preset("tiny")), tmp_path / "small")
    size = (tmp_path / "big" / "model.safetensors").stat().st_size
    res = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "small"), str(tmp_path / "big")],
        capture_output=True,
        text=True,
        check=True,
    )
    peak = int(res.stdout.split()[-1])
    assert peak >= 0.9 * size  # sanity: the probe sees the model's own memory
    assert peak < 1.5 * size, f"peak {peak / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB file"
