"""quantize_checkpoint: quantizing a Hugging Face model folder that does not fit in memory
(docs/SCALE.md).

    report = int4kit.quantize_checkpoint("llama-70b", "llama-70b-int4",
                                         QuantConfig(method="gptq"), calib_data, skip=["lm_head"])

The model is built on the meta device (int4kit.skeleton: no weights, real buffers such as the
rotary frequencies). Data-free methods (rtn, hqq) then stream the source one shard at a time:
each target Linear's weight is quantized as it is met. Calibration methods (gptq, awq, awq+gptq,
adaround) go block by block (the elements of the model's ModuleList of transformer blocks):
  1. the tensors outside the blocks are loaded and one pass records the first block's inputs
     (the calibration batches stop there);
  2. for each block: its weights are read from the source, `quantize_model` quantizes it on
     those inputs stage by stage (with the first norm the model calls after the block
     appended, so norm weighting sees what it sees in the whole model; `_quantize_block`), the
     block then computes the next block's inputs through stand-ins of its int4 layers (as
     quantize_model's later stages see earlier ones), its tensors are written as one output
     shard, and it goes back to the meta device.
Both give the codes `quantize_model` gives on the whole model with the same options.

Memory (docs/SCALE.md): one block (its weights not yet quantized, its int4 layers), the
calibration statistics of one stage, the GPTQ solve (bench/bench_gptq.py) and the block inputs
(batches x tokens x hidden); with glibc, MALLOC_MMAP_THRESHOLD_=65536 in the environment
lowers the peak further (freed buffers go straight back). Interrupted, the run resumes from the
last finished block (or source shard): dst_dir/.int4kit-partial holds a journal and the next
block's inputs, and the finished blocks' shards are kept under temporary names, which never load
as a checkpoint. Nothing in dst_dir loads as a complete checkpoint before the run ends.
"""
import ctypes
import hashlib
import json
import os
import shutil
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .. import hf
from ..formats.convert import write_side_files
from ..formats.files import (_TORCH_DTYPES, CheckpointError, CheckpointReader, ShardWriter,
                             check_src_dst, parse_size, read_json, write_json_atomic)
from ..formats.native import (FORMAT_VERSION, METADATA_KEY, QUANT_METHOD, _set_tensor,
                              check_nothing_missing, layer_settings, model_tensor_aliases,
                              skeleton)
from ..nn import Int4Linear, QuantLinear, replace_module
from ..quant import QuantConfig, QuantReport, quantize_model
from ..quant import calibration
from ..quant.blocks import _block_inputs, _first_tensor
from ..quant.model import (DequantizingStandIn, _data_free, calibration_batches_for, layer_plan,
                           run_method, stored_bytes)

PARTIAL_DIR = ".int4kit-partial"
JOURNAL = "journal.json"
INPUTS = "inputs.safetensors"


def quantize_checkpoint(src_dir: Union[str, os.PathLike], dst_dir: Union[str, os.PathLike],
                        config: Optional[QuantConfig] = None, calib_data=None,
                        skip: Iterable[str] = (),
                        filter_fn: Optional[Callable[[str, nn.Module], bool]] = None,
                        max_shard_size: Union[int, str] = "1GB",
                        layer_configs=None) -> QuantReport:
    """Quantizes the Hugging Face model folder `src_dir` into an int4kit checkpoint in
    `dst_dir` without loading the whole model (module docstring); returns the QuantReport.

    config, calib_data, skip, filter_fn, layer_configs: as in quantize_model (calibration
      batches are model inputs; their attention_mask keeps padding out of the statistics; a
      mixed-precision plan applies as it does there).
    max_shard_size: output shards are at most this big (a block's tensors always start a new
      one); memory holds up to one shard of tensors outside the blocks.
    A run interrupted part-way resumes when called again with the same arguments.
    """
    config = config if config is not None else QuantConfig()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be an int4kit.QuantConfig, got {type(config).__name__}")
    src, dst = check_src_dst(src_dir, dst_dir, "src_dir", "dst_dir")
    max_bytes = parse_size(max_shard_size)
    reader = CheckpointReader(src)
    model = _skeleton_of(src)
    configs, skipped = layer_plan(model, config, layer_configs, skip, filter_fn)
    targets = list(configs)
    aliases = model_tensor_aliases(model)
    _check_source(model, reader, aliases)
    batches = calibration_batches_for(configs, config, calib_data)
    start = time.perf_counter()
    if config.method == "adaround" and config.reconstruction == "block":
        raise ValueError("QuantConfig(reconstruction='block') reconstructs each block against the "
                         "full-precision model's block outputs, which quantize_checkpoint does "
                         "not compute; use reconstruction='layer' (or quantize_model)")
    report = QuantReport(method=run_method(configs, config))
    report.skipped.extend(skipped)
    os.makedirs(dst, exist_ok=True)
    run = _Run(dst, max_bytes, _fingerprint(src, reader, config, configs, batches))
    if batches is None:
        layers = _stream_data_free(model, reader, configs, config, run, report)
    else:
        layers = _block_by_block(model, reader, configs, batches, config, run, report)
    quant_config = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "bits": 4,
                    "layers": layers,
                    "aliases": {k: v for k, v in aliases.items() if k not in reader}}
    run.writer.finish({METADATA_KEY: json.dumps(quant_config, separators=(",", ":"))})
    write_side_files(src, dst, quant_config, "int4kit")
    run.close()
    report.swapped = [name for name in targets if name in layers]
    report.bytes_before = sum(reader.nbytes(key) for key in reader.keys())
    report.bytes_after = run.writer.total_bytes
    report.layer_sizes = _layer_sizes(model, reader, layers)
    report.seconds = time.perf_counter() - start
    return report


# ---- the source ----------------------------------------------------------------------------------

def _skeleton_of(src: str) -> nn.Module:
    """The model of a Hugging Face folder with its parameters on the meta device."""
    import transformers
    try:
        config = transformers.AutoConfig.from_pretrained(src)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"src_dir {src!r} is not a Hugging Face model folder "
                              f"({str(error).splitlines()[0]})") from None
    with skeleton():
        model = hf.model_class(config)(config)
    return model.eval()


def _check_source(model: nn.Module, reader: CheckpointReader, aliases: Dict[str, str]) -> None:
    """Every tensor of the model is in the source (or tied to one that is), before anything is
    written."""
    check_nothing_missing(reader, [key for key in model.state_dict(keep_vars=True)
                                   if key not in reader and aliases.get(key) not in reader])


def _layer_sizes(model: nn.Module, reader: CheckpointReader, layers: Dict[str, dict]
                 ) -> Dict[str, Tuple[int, int]]:
    """QuantReport.layer_sizes without reading the output back (opening it would map it): a
    quantized layer's bytes from its settings, a dense one's from the source's headers (a tied
    layer has no tensor of its own there and is left out)."""
    sizes = {}
    for name, module in model.named_modules():
        own_tensors = name in layers or f"{name}.weight" in reader
        if not isinstance(module, (nn.Linear, QuantLinear)) or not own_tensors:
            continue
        bias = f"{name}.bias"
        if name in layers:
            dtype = _TORCH_DTYPES[reader.shape_dtype(bias)[1]] if bias in reader else None
            size = stored_bytes(hf.meta_layer(layers[name], dtype))
        else:
            size = sum(reader.nbytes(key) for key in (f"{name}.weight", bias) if key in reader)
        sizes[name] = (size, module.in_features * module.out_features)
    return sizes


def _load(model: nn.Module, reader: CheckpointReader, keys: Iterable[str],
          aliases: Dict[str, str]) -> None:
    for key in keys:
        _set_tensor(model, key, reader.get(key if key in reader else aliases[key]))


def _fingerprint(src: str, reader: CheckpointReader, config: QuantConfig,
                 configs: Dict[str, QuantConfig], batches) -> str:
    """What a resumed run must share with the interrupted one: source files (names, sizes,
    modification times), options, each target's config and the calibration data's bytes."""
    digest = hashlib.sha256()
    for path in reader.files():
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    digest.update(repr(config).encode())
    digest.update("|".join(f"{name}={cfg!r}" for name, cfg in configs.items()).encode())
    for item in batches or ():
        for name, tensor in calibration._tensors_of(item):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class _Run:
    """The output writer and the journal that lets an interrupted run resume: after each unit
    (a block, or a source shard for data-free methods) the writer's temporary shards, the layer
    settings so far and (block by block) the next block's inputs are recorded."""

    def __init__(self, dst: str, max_bytes: int, fingerprint: str):
        self.dst, self.fingerprint = dst, fingerprint
        self.partial = os.path.join(dst, PARTIAL_DIR)
        journal = os.path.join(self.partial, JOURNAL)
        previous = read_json(journal) if os.path.isfile(journal) else None
        self.done, self.layers = 0, {}
        if previous is not None and previous.get("fingerprint") == fingerprint:
            self.writer = ShardWriter.resume(dst, max_bytes, previous["writer"])
            self.done, self.layers = previous["done"], previous["layers"]
        else:
            if previous is not None:  # another run's leftovers: its temporary shards go
                for name, _ in previous.get("writer", {}).get("written", []):
                    if os.path.isfile(os.path.join(dst, name)):
                        os.remove(os.path.join(dst, name))
            shutil.rmtree(self.partial, ignore_errors=True)
            self.writer = ShardWriter(dst, max_bytes)

    def record(self, done: int, layers: Dict[str, dict],
               inputs: Optional[List[torch.Tensor]] = None) -> None:
        """Unit `done - 1` is written: flush it and journal it (the inputs first, the journal
        last, each replaced atomically)."""
        self.writer.flush()
        _return_freed_memory()
        os.makedirs(self.partial, exist_ok=True)
        if inputs is not None:
            import safetensors.torch
            tmp = os.path.join(self.partial, INPUTS + ".tmp")
            safetensors.torch.save_file({str(i): t.contiguous() for i, t in enumerate(inputs)},
                                        tmp)
            os.replace(tmp, os.path.join(self.partial, INPUTS))
        write_json_atomic(os.path.join(self.partial, JOURNAL),
                          {"fingerprint": self.fingerprint, "done": done, "layers": layers,
                           "writer": self.writer.state()})
        self.done, self.layers = done, layers

    def saved_inputs(self) -> List[torch.Tensor]:
        import safetensors.torch
        tensors = safetensors.torch.load_file(os.path.join(self.partial, INPUTS))
        return [tensors[str(i)] for i in range(len(tensors))]

    def close(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)


def _return_freed_memory() -> None:
    """Hands memory freed by the last block back to the system (glibc's malloc_trim): without
    it, the allocator keeps each block's freed buffers in fragments it cannot reuse whole, and
    the process grows by ~100 MB a block on a 2048-wide model (docs/SCALE.md)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _progress(iterable, config: QuantConfig, desc: str):
    return calibration.progress(iterable, config.show_progress, desc=desc)


# ---- data-free: shard by shard -------------------------------------------------------------------

def _stream_data_free(model, reader, configs, config, run, report) -> Dict[str, dict]:
    linear_of = {f"{name}.{part}": name for name in configs for part in ("weight", "bias")}
    layers = dict(run.layers)
    shards = list(reader.keys_by_file().items())
    for index, (_, keys) in enumerate(_progress(shards, config, f"{report.method} shards")):
        if index < run.done:
            continue
        for key in keys:
            name = linear_of.get(key)
            if name is None:
                run.writer.add(key, reader.get(key))
            elif name not in layers:  # its weight and bias, wherever they are
                layers[name] = _quantize_loose(model, reader, name, configs[name], run.writer)
        run.record(index + 1, layers)
    return layers


def _quantize_loose(model, reader, name: str, config: QuantConfig, writer: ShardWriter) -> dict:
    """One layer quantized with a data-free method from its tensors in the source, written, and
    dropped; returns its settings."""
    linear = model.get_submodule(name)
    _load(model, reader, [f"{name}.{p}" for p, t in linear._parameters.items() if t is not None],
          {})
    built = _data_free(model.get_submodule(name), config)
    _write_layer(writer, name, built, config)
    model.get_submodule(name).to("meta")
    return layer_settings(built)


def _write_layer(writer: ShardWriter, name: str, layer: Int4Linear, config: QuantConfig) -> None:
    layer.method, layer.act_quant = config.method, config.act_quant
    own: Dict[str, torch.Tensor] = {}
    layer._save_to_state_dict(own, f"{name}.", False)
    for key, tensor in own.items():
        if tensor is not None:
            writer.add(key, tensor)


# ---- calibration: block by block -----------------------------------------------------------------

class _BlockStep(nn.Module):
    """One block, then the first norm the model calls after it (only so that norm weighting finds
    it, as in the whole model). Called with a calibration item of quantize_checkpoint: the
    block's recorded inputs with this block's hidden states."""

    def __init__(self, block: nn.Module, next_norm: Optional[nn.Module]):
        super().__init__()
        self.block, self.next_norm = block, next_norm

    def forward(self, hidden_states, recorded, attention_mask=None):
        args, kwargs = recorded
        output = self.block(hidden_states, *args[1:], **kwargs)
        if self.next_norm is not None:
            self.next_norm(_first_tensor(output))
        return output


def _block_list(model: nn.Module, targets: List[str]) -> Tuple[str, nn.ModuleList]:
    """The ModuleList whose elements hold the target layers (one list: the transformer blocks)."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    owners = {}
    for target in targets:
        owner = max((name for name, _ in lists if target.startswith(name + ".")), key=len,
                    default=None)
        if owner is None:
            raise ValueError(f"layer {target!r} is in no block (an element of an nn.ModuleList); "
                             f"quantize_checkpoint calibrates block by block: skip it (e.g. "
                             f"skip=['lm_head']) or use a data-free method (rtn, hqq)")
        owners[owner] = None
    if len(owners) != 1:
        raise ValueError(f"the target layers lie in {len(owners)} block lists "
                         f"({', '.join(owners)}); quantize_checkpoint handles one")
    name = next(iter(owners))
    return name, model.get_submodule(name)


def _norm_after(model, list_name: str, blocks: nn.ModuleList, index: int,
                first_norm: Optional[str]) -> Optional[nn.Module]:
    """The first norm the model calls after block `index`: the next block's first (by the name
    it has in the block), or after the last block the first norm registered after the list."""
    if index + 1 < len(blocks):
        return None if first_norm is None else blocks[index + 1].get_submodule(first_norm)
    after = False
    for name, module in model.named_modules():
        if name == list_name:
            after = True
        elif after and not name.startswith(list_name + ".") and calibration.is_norm(module):
            return module
    return None


def _first_norm_called(block: nn.Module, recorded) -> Optional[str]:
    """The name (inside the block) of the first norm the block calls."""
    called: List[str] = []
    names = {id(m): n for n, m in block.named_modules() if calibration.is_norm(m)}

    def hook(module, args):
        called.append(names[id(module)])
    norms = [m for m in block.modules() if calibration.is_norm(m)]
    args, kwargs = recorded
    with calibration.hooks(m.register_forward_pre_hook(hook) for m in norms), torch.no_grad():
        block(*args, **kwargs)
    return called[0] if called else None


def _block_by_block(model, reader, configs, batches, config, run, report) -> Dict[str, dict]:
    # data-free layers outside the blocks (an lm_head kept to rtn) need no calibration pass
    in_blocks = _in_blocks(model, configs)
    targets = [name for name in configs if name in in_blocks or configs[name].needs_calibration]
    list_name, blocks = _block_list(model, targets)
    aliases = model_tensor_aliases(model)
    prefix = list_name + "."
    outside = [k for k in model.state_dict(keep_vars=True) if not k.startswith(prefix)]
    _load(model, reader, outside, aliases)
    calibration.check_batches(model, batches)
    recorded = _block_inputs(model, batches, blocks[0])
    state = model.state_dict(keep_vars=True)
    for key in outside:  # needed for that pass only: the output copies them from the source
        _set_tensor(model, key, state[key].detach().to("meta"))
    masks = [calibration.attention_mask_of(item) for item in batches]
    hidden = [args[0] for args, _ in recorded] if run.done == 0 else run.saved_inputs()
    layers = dict(run.layers)
    first_norm = None
    for index in _progress(range(len(blocks)), config, f"{report.method} blocks"):
        if index < run.done:
            continue
        block_name = f"{list_name}.{index}"
        block = blocks[index]
        _load(model, reader, [f"{block_name}.{k}" for k in block.state_dict(keep_vars=True)],
              aliases)
        if first_norm is None:
            first_norm = _first_norm_called(block, (
                (hidden[0],) + tuple(recorded[0][0][1:]), recorded[0][1]))
        next_norm = _norm_after(model, list_name, blocks, index, first_norm)
        if next_norm is not None:
            norm_name = next(n for n, m in model.named_modules() if m is next_norm)
            _load(model, reader, [f"{norm_name}.{k}" for k in
                                  next_norm.state_dict(keep_vars=True)], aliases)
        step = _BlockStep(block, next_norm)
        items = [{"hidden_states": h, "recorded": r, **({} if m is None else {"attention_mask": m})}
                 for h, r, m in zip(hidden, recorded, masks)]
        own_configs = {f"block.{name[len(block_name) + 1:]}": configs[name] for name in targets
                       if name.startswith(block_name + ".")}
        built = {f"{block_name}.{name[len('block.'):]}": layer for name, layer in
                 _quantize_block(step, own_configs, items, config, report, block_name).items()}
        hidden = _next_inputs(step, items, built, block_name)
        for name, layer in built.items():
            layers[name] = layer_settings(layer)
        own_tensors: Dict[str, torch.Tensor] = {}
        for name, module in block.named_modules():
            module._save_to_state_dict(own_tensors, f"{block_name}.{name}." if name
                                       else f"{block_name}.", False)
        for key, tensor in own_tensors.items():  # a tied alias is in neither
            if tensor is not None and (key in reader or key.rpartition(".")[0] in built):
                run.writer.add(key, tensor)
        block.to("meta")
        run.record(index + 1, layers, hidden)
    loose = [name for name in configs if name not in targets]
    loose_keys = {f"{name}.{part}" for name in loose for part in ("weight", "bias")}
    for key in outside:
        if key in reader and key not in loose_keys:
            run.writer.add(key, reader.get(key))
    for name in loose:
        layers[name] = _quantize_loose(model, reader, name, configs[name], run.writer)
    return layers


def _in_blocks(model: nn.Module, names) -> set:
    """Those of `names` that lie inside an nn.ModuleList."""
    lists = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, nn.ModuleList))
    return {name for name in names if name.startswith(lists)}


def _quantize_block(step: _BlockStep, own: Dict[str, QuantConfig], items, config: QuantConfig,
                    report: QuantReport, block_name: str) -> Dict[str, Int4Linear]:
    """quantize_model on one block's layers `own` (names in `step` -> their configs; `config`
    holds the calibration settings); returns them quantized.

    AWQ methods in one call (a fold scales a layer of an earlier stage, which the call must
    still hold). The others one stage at a time, in the order quantize_model would take them:
    after each call the stage's Int4Linear layers give way to DequantizingStandIn (what
    quantize_model's own later stages run through), so each stage's dense weights are freed
    as soon as it is done, not when the block is."""
    if not own:
        return {}
    if any(cfg.method in ("awq", "awq+gptq") for cfg in own.values()):
        stages = [list(own)]
    else:
        stages, unreached = calibration.plan_stages(
            step, items[0], {name: step.get_submodule(name) for name in own})
        stages += [unreached] if unreached else []
    dtype = items[0]["hidden_states"].dtype  # what the block computes in
    built: Dict[str, Int4Linear] = {}
    for stage in stages:
        members = set(stage)
        _merge(report, quantize_model(step, config, items,
                                      filter_fn=lambda name, module: name in members,
                                      layer_configs={name: own[name] for name in stage}),
               block_name)
        for name in stage:
            built[name] = step.get_submodule(name)
            replace_module(step, name, DequantizingStandIn(built[name], dtype))
        _return_freed_memory()
    return built


def _next_inputs(step: _BlockStep, items, built: Dict[str, Int4Linear],
                 block_name: str) -> List[torch.Tensor]:
    """The block's outputs on every batch, computed through stand-ins of its int4 layers (what
    quantize_model's later stages run through; for AWQ, from the stored, folded layers: its
    later stages see the folded dense stand-in, equal up to one rounding of the fold)."""
    dtype = items[0]["hidden_states"].dtype
    for name, layer in built.items():
        replace_module(step.block, name[len(block_name) + 1:], DequantizingStandIn(layer, dtype))
    try:
        with torch.no_grad():
            return [_first_tensor(step.block(item["hidden_states"], *item["recorded"][0][1:],
                                             **item["recorded"][1])).detach()
                    for item in items]
    finally:
        for name, layer in built.items():
            replace_module(step.block, name[len(block_name) + 1:], layer)


def _merge(report: QuantReport, block_report: QuantReport, block_name: str) -> None:
    def full(name):
        return f"{block_name}.{name[len('block.'):]}" if name.startswith("block.") else name
    report.notes.extend((full(n), note) for n, note in block_report.notes)
    report.fallbacks.extend((full(n), why) for n, why in block_report.fallbacks)
    report.layer_errors.update((full(n), e) for n, e in block_report.layer_errors.items())
