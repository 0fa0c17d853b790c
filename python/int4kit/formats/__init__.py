"""Checkpoint formats (docs/CHECKPOINT.md): int4kit's native safetensors format (native.py), the
shard reader and writer every format shares (files.py), GPTQ, AWQ and compressed-tensors layers
as pure per-layer conversions (gptq.py, awq.py, compressed_tensors.py) and the file-level
convert_checkpoint (convert.py)."""
from .convert import ConvertReport, convert_checkpoint
from .files import CheckpointError, CheckpointReader, ShardWriter, parse_size
from .native import (FORMAT_VERSION, load_quantized, quantization_config, save_quantized,
                     skeleton)

__all__ = ["CheckpointError", "CheckpointReader", "ShardWriter", "parse_size", "FORMAT_VERSION",
           "load_quantized", "quantization_config", "save_quantized", "skeleton",
           "ConvertReport", "convert_checkpoint"]
