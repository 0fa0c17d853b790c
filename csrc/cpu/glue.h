// Helpers shared by the torch glue files (ops.cpp, cpu/ops_cpu.cpp).
#pragma once

#include "int4kit/kernels.h"

namespace int4kit {
namespace cpu {

// INT4KIT_CPU_ISA (scalar, avx2, or auto/unset for the best the CPU supports), read on every call
// so tests can switch paths; raises for an unknown or unsupported name.
Isa selected_isa();

}  // namespace cpu
}  // namespace int4kit
