"""Checkpoint formats: int4kit's native safetensors format (native.py) and the shared shard
reader and writer (files.py). docs/CHECKPOINT.md describes the files byte by byte."""
from .files import CheckpointError, CheckpointReader, ShardWriter, parse_size
from .native import (FORMAT_VERSION, load_quantized, quantization_config, save_quantized,
                     skeleton)

__all__ = ["CheckpointError", "CheckpointReader", "ShardWriter", "parse_size", "FORMAT_VERSION",
           "load_quantized", "quantization_config", "save_quantized", "skeleton"]
