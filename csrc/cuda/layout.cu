// Conversions between the canonical format and the CUDA prepacked layout, and dequantization from
// it: the launches (the kernels are in layout_kernels.cuh).
#include "cuda/layout_kernels.cuh"
#include "int4kit/cuda_kernels.h"

namespace int4kit {
namespace cuda {

using namespace layout_kernels;

int prepack(const uint8_t* qweight, const void* scales, const void* zeros,
            const cuda_layout::Shape& shape, uint8_t* packed, void* stream_ptr) {
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t words = shape.codes_bytes() / 4;
  prepack_codes_kernel<<<elementwise_grid(words), kElementwiseThreads, 0, stream>>>(
      qweight, shape.N, shape.K, shape.chunks(), words, reinterpret_cast<uint32_t*>(packed));
  uint8_t* records = packed + shape.codes_bytes();
  const int64_t values = shape.records_bytes() / scale_bytes(shape.scale_dtype);
  const unsigned grid = elementwise_grid(values);
  if (shape.scale_dtype == DType::F32) {
    prepack_records_kernel<uint32_t><<<grid, kElementwiseThreads, 0, stream>>>(
        static_cast<const uint32_t*>(scales), static_cast<const uint32_t*>(zeros), kEightF32,
        shape.N, shape.groups(), values, reinterpret_cast<uint32_t*>(records));
  } else {
    prepack_records_kernel<uint16_t><<<grid, kElementwiseThreads, 0, stream>>>(
        static_cast<const uint16_t*>(scales), static_cast<const uint16_t*>(zeros),
        shape.scale_dtype == DType::BF16 ? kEightBF16 : kEightF16, shape.N, shape.groups(), values,
        reinterpret_cast<uint16_t*>(records));
  }
  const int err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return cudaMemsetAsync(records + shape.records_bytes(), 0, shape.footer_bytes(), stream);
}

int unprepack(const uint8_t* packed, const cuda_layout::Shape& shape, uint8_t* qweight,
              void* scales, void* zeros, void* stream_ptr) {
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t bytes = shape.N * packed_row_bytes(shape.K);
  unprepack_codes_kernel<<<elementwise_grid(bytes), kElementwiseThreads, 0, stream>>>(
      reinterpret_cast<const uint32_t*>(packed), shape.N, shape.K, shape.chunks(), qweight);
  const uint8_t* records = packed + shape.codes_bytes();
  const unsigned grid = elementwise_grid(shape.N * shape.groups());
  if (shape.scale_dtype == DType::F32) {
    unprepack_records_kernel<uint32_t><<<grid, kElementwiseThreads, 0, stream>>>(
        reinterpret_cast<const uint32_t*>(records), shape.N, shape.groups(),
        static_cast<uint32_t*>(scales), static_cast<uint32_t*>(zeros));
  } else {
    unprepack_records_kernel<uint16_t><<<grid, kElementwiseThreads, 0, stream>>>(
        reinterpret_cast<const uint16_t*>(records), shape.N, shape.groups(),
        static_cast<uint16_t*>(scales), static_cast<uint16_t*>(zeros));
  }
  return cudaGetLastError();
}

int dequantize_prepacked(const uint8_t* packed, const cuda_layout::Shape& shape, void* out,
                         DType out_dtype, void* stream) {
  // 32-bit columns and groups (FastDivisor takes n < 2^31): a row of 2^31 codes is 1 GiB
  if (shape.K <= 0 || shape.K >= (int64_t(1) << 31) || shape.G <= 0) return cudaErrorInvalidValue;
  const int64_t slots = shape.codes_bytes() / 16;
  const auto s = static_cast<cudaStream_t>(stream);
  const bool lane_groups = shape.G % 16 == 0 || shape.groups() == 1;
  auto run = [&](auto* typed_out) {
    dequantize_prepacked_kernel<<<elementwise_grid(slots), kElementwiseThreads, 0, s>>>(
        reinterpret_cast<const uint4*>(packed), packed + shape.codes_bytes(), shape.scale_dtype,
        shape.N, int(shape.K), int(shape.groups()), FastDivisor(uint32_t(shape.G)), lane_groups,
        shape.chunks(), slots, typed_out);
    return cudaGetLastError();
  };
  switch (out_dtype) {
    case DType::F32: return run(static_cast<float*>(out));
    case DType::BF16: return run(static_cast<__nv_bfloat16*>(out));
    default: return run(static_cast<__half*>(out));
  }
}

}  // namespace cuda
}  // namespace int4kit
