// The tile GEMM of the packed attention kernels.
//
// NOTE: at::native::cpublas::gemm (ATen/native/CPUBlas.h), which PyTorch's own CPU flash attention uses, is
// not callable from an extension: its float/double overloads are not exported from libtorch_cpu (torch
// 2.13: "undefined symbol: at::native::cpublas::gemm(..., double, double const*, ...)" at import). On
// MKL/OpenBLAS builds those overloads are thin wrappers over the Fortran BLAS sgemm_/dgemm_, which
// libtorch_cpu does export; we call those directly, declared weak so that the extension still loads where
// torch was built without BLAS, and fall back to at::addmm_ on tensor views there (a few microseconds of
// dispatcher overhead per tile).
#include <ATen/ATen.h>

#include <climits>

#include "packed_attention/kernel_utils.h"

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace mmcore::packed_attention {
namespace {

// C = alpha op(A) op(B) + beta C through the dispatcher, for torch builds without an exported BLAS.
template <typename T>
void gemm_rm_aten(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                  const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* ptr, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    at::Tensor t = at::from_blob(const_cast<T*>(ptr), trans ? at::IntArrayRef{cols, rows} : at::IntArrayRef{rows, cols},
                                 {ld, 1}, opts);
    return trans ? t.t() : t;
  };
  at::Tensor cv = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  // addmm with beta = 0 ignores the old contents of C, NaN included, as BLAS does.
  cv.addmm_(view(a, m, k, lda, trans_a), view(b, k, n, ldb, trans_b), beta, alpha);
}

// Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands, keep the flags.
template <typename T, typename Blas>
void gemm_rm_blas(Blas blas, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                  int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
  const int lda_i = static_cast<int>(ldb), ldb_i = static_cast<int>(lda), ldc_i = static_cast<int>(ldc);
  blas(&ta, &tb, &mi, &ni, &ki, &alpha, b, &lda_i, a, &ldb_i, &beta, c, &ldc_i);
}

}  // namespace

// Tile sizes and leading dimensions (<= heads * head_dim, checked at the entry points) fit in int.
void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
             int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (sgemm_ != nullptr) {
    gemm_rm_blas(sgemm_, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  } else {
    gemm_rm_aten(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}

void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
             int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  if (dgemm_ != nullptr) {
    gemm_rm_blas(dgemm_, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  } else {
    gemm_rm_aten(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}

}  // namespace mmcore::packed_attention
