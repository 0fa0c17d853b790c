"""int4kit: INT4 weight quantization for PyTorch with hand-written CPU and CUDA kernels.

    import int4kit
    layer = int4kit.Int4Linear.from_linear(linear, group_size=128, symmetric=False)
    layer8 = int4kit.Int8Linear.from_linear(linear, group_size=-1)  # weight-only int8
    report = int4kit.quantize_model(model, int4kit.QuantConfig(group_size=128))
    int4kit.save_quantized(model, "out")          # or model.save_pretrained("out") (transformers)
    int4kit.load_quantized(skeleton_model, "out")
    int4kit.qat.prepare_qat(model, int4kit.qat.QATConfig(...)); train; int4kit.qat.convert(model)
    parallelize_module(model, mesh, int4kit.parallel.llama_plan(model))   # tensor parallel
    int4kit.quantize_checkpoint(src_dir, dst_dir, config, calib_data)     # larger than memory
    table = int4kit.measure_sensitivity(model, candidates, calib_data)    # mixed precision
    int4kit.quantize_model(model, config, calib_data,
                           layer_configs=int4kit.plan_mixed_precision(table, bits_per_weight=4.5))

The ops are also available directly as torch.ops.int4kit.* (see int4kit.ops).
"""
from . import hf, ops, qat, reference
from .formats import (CheckpointError, convert_checkpoint, load_quantized, save_quantized,
                      skeleton)
from .nn import Int4Linear, Int8Linear
from .ops import cpu_isa
from .quant import (MixedPrecisionPlan, QuantConfig, QuantReport, RecalibrationReport,
                    SensitivityTable, ShiftReport, measure_sensitivity, plan_mixed_precision,
                    quantize_model, recalibrate, shift_report)

__all__ = ["Int4Linear", "Int8Linear", "QuantConfig", "QuantReport", "quantize_model", "measure_sensitivity",
           "plan_mixed_precision", "SensitivityTable", "MixedPrecisionPlan", "shift_report",
           "ShiftReport", "recalibrate", "RecalibrationReport", "ops", "qat",
           "reference",
           "cpu_isa", "save_quantized", "load_quantized", "skeleton", "CheckpointError",
           "convert_checkpoint", "parallel", "quantize_checkpoint"]
__version__ = "0.1.0"



def __getattr__(name):
    # int4kit.parallel imports torch.distributed's tensor-parallel stack (~0.5 s): only when used
    if name in ("parallel", "quantize_checkpoint"):
        import importlib
        parallel = importlib.import_module(".parallel", __name__)
        return parallel if name == "parallel" else parallel.quantize_checkpoint
    raise AttributeError(f"module 'int4kit' has no attribute {name!r}")


hf.install()  # transformers' from_pretrained knows quant_method "int4kit" from here on
