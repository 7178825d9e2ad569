// The activation element types the CUDA kernels are instantiated for, shared by every op's torch-free launcher
// header (host code: included by the torch glue and by nvcc alike). fp64 GEMMs run on the cpu and reference
// backends; kFloat64 is for the elementwise kernels that also take fp64 (merge_experts).
#pragma once

namespace fsosr {
namespace cuda {

enum class ElementType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

}  // namespace cuda
}  // namespace fsosr
