"""Quantization-aware training: prepare -> train -> convert (docs/QAT.md).

    from int4kit import qat
    report = qat.prepare_qat(model, qat.QATConfig(base=QuantConfig(group_size=128, symmetric=False,
                                                   method="gptq"), qparams="learned"), calib_data)
    optimizer = torch.optim.AdamW(qat.param_groups(model, weight_lr=1e-5, qparam_lr=1e-4))
    ... loss = qat.distill_loss(model(**batch), teacher(**batch), cosine=1.0, ...) ...
    qat.convert(model)          # FakeQuantLinear -> Int4Linear with exactly the trained codes
"""
from .distill import distill_loss, pooled
from .fake_quant import FakeQuantLinear, QATError, fake_quant_activations_int8
from .prepare import QATConfig, QATReport, convert, param_groups, prepare_qat, set_fake_quant

__all__ = ["QATConfig", "QATReport", "QATError", "FakeQuantLinear", "prepare_qat", "convert",
           "param_groups", "set_fake_quant", "distill_loss", "pooled",
           "fake_quant_activations_int8"]
