"""Smoke tests of the benchmark scripts' entry points: each main() runs end to end on a tiny
setting (the figures themselves are not checked here; the benchmarks compare side by side)."""
import os
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))


def test_bench_linear(capsys):
    import bench_linear
    assert bench_linear.main(["--quick", "--mode", "hot", "--shapes", "256x128", "--m", "1", "8",
                              "--dtype", "bf16", "--budget", "0.02"]) == 0
    assert "256x128" in capsys.readouterr().out


def test_bench_linear_cuda_entry_point(capsys):
    import bench_linear
    assert bench_linear.main(["--device", "cuda", "--shapes", "256x128", "--m", "1"]) == 0
    if not torch.cuda.is_available():
        assert "no CUDA device" in capsys.readouterr().out


def test_bench_gptq(capsys):
    import bench_gptq
    assert bench_gptq.main(["--features", "128", "--tokens", "512", "--batch", "256",
                            "--group-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "GPTQ pass" in out
    ratio = float(out.strip().splitlines()[-1].split("|")[-2])
    assert 0 < ratio < 1  # GPTQ below RTN on its own objective


def test_bench_decode(capsys):
    import bench_decode
    bench_decode.main(["--small", "--layers", "1", "--hidden", "128", "--intermediate", "256",
                       "--heads", "4", "--kv-heads", "2", "--vocab", "512", "--new-tokens", "2",
                       "--prompt-tokens", "4", "--prefill-tokens", "8", "--repeats", "1",
                       "--warmup-tokens", "1", "--no-check"])
    assert "int4kit W4A16" in capsys.readouterr().out


@pytest.mark.skipif(not (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc").exists(),
                    reason="needs nvcc")
def test_cuda_resources(capsys):
    import cuda_resources
    assert cuda_resources.main(["--archs", "9.0a"]) == 0
    assert "linear_kernel<bf16" in capsys.readouterr().out
