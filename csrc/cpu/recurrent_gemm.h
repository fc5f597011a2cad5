// The per-step recurrent product of the CPU kernels, C = A * op(W) (+ C), with W packed once per
// call into MKL's internal layout when that is possible.
//
// The x86 torch wheels link MKL into libtorch_cpu and export its packed-GEMM entry points and the
// Fortran sgemm_. They are declared weak here: where a torch build does not export them they
// resolve to null and the product runs through ATen (at::mm) instead, so the extension still
// loads and computes the same thing. ATen's own cpublas::gemm is not exported by the wheels.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstddef>
#include <memory>
#include <type_traits>

extern "C" {
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                      const float* src, int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a,
                         int lda, const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
}

namespace lstm_fused {
namespace CPU_CAPABILITY {  // one copy per SIMD level: cpu_kernels.h

// The right-hand operand of every step's product: op(W) = W^T (forward, W_hh is [4H, P]) or
// W (backward). Rows of A and C are contiguous (leading dimensions = their widths).
class RecurrentGemm {
 public:
  // MKL's CBLAS constants (mkl_cblas.h).
  static constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;

  // Packing pays off over several products: for fewer than kMinPackedSteps (an LSTMCell call is
  // one step) sgemm_ runs on the weight as it is.
  static constexpr int64_t kMinPackedSteps = 4;

  RecurrentGemm(const at::Tensor& weight, bool transposed, int64_t max_rows, int64_t steps)
      : weight_(weight.contiguous()), transposed_(transposed), max_rows_(max_rows) {
    k_ = transposed ? weight_.size(1) : weight_.size(0);
    n_ = transposed ? weight_.size(0) : weight_.size(1);
    if (weight_.scalar_type() == at::kFloat && mkl_available() && max_rows > 0 && k_ > 0 && n_ > 0 &&
        steps >= kMinPackedSteps) {
      const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, int(max_rows), int(n_), int(k_));
      packed_ = at::empty({static_cast<int64_t>((bytes + sizeof(float) - 1) / sizeof(float))},
                          weight_.options());
      cblas_sgemm_pack(kRowMajor, kBMatrix, transposed ? kTrans : kNoTrans, int(max_rows), int(n_),
                       int(k_), 1.0f, weight_.data_ptr<float>(), int(weight_.size(1)),
                       packed_.data_ptr<float>());
    }
  }

  // c[rows, n] = a[rows, k] * op(W) + (accumulate ? c : 0), all rows contiguous.
  template <typename scalar_t>
  void run(const scalar_t* a, int64_t rows, scalar_t* c, bool accumulate) const {
    if (rows == 0 || n_ == 0) return;
    if (k_ == 0) {  // an empty product (input_size 0): BLAS refuses its zero leading dimensions
      if (!accumulate) std::fill_n(c, rows * n_, scalar_t(0));
      return;
    }
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (mkl_available()) {
        const float beta = accumulate ? 1.0f : 0.0f;
        if (packed_.defined() && rows == max_rows_) {
          cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, int(rows), int(n_), int(k_), a, int(k_),
                              packed_.data_ptr<float>(), int(n_), beta, c, int(n_));
          return;
        }
        // Row-major C = A op(W) is column-major C^T = op(W)^T A^T.
        const char trans_w = transposed_ ? 'T' : 'N', no_trans = 'N';
        const int m = int(n_), n = int(rows), k = int(k_), ldw = int(weight_.size(1));
        const float alpha = 1.0f;
        sgemm_(&trans_w, &no_trans, &m, &n, &k, &alpha, weight_.data_ptr<float>(), &ldw, a, &k, &beta, c, &m);
        return;
      }
    }
    const auto options = weight_.options();
    const at::Tensor a_t = at::from_blob(const_cast<scalar_t*>(a), {rows, k_}, options);
    at::Tensor c_t = at::from_blob(c, {rows, n_}, options);
    const at::Tensor op_w = transposed_ ? weight_.t() : weight_;
    if (accumulate) {
      c_t.addmm_(a_t, op_w);
    } else {
      at::mm_out(c_t, a_t, op_w);
    }
  }

  static bool mkl_available() {
    return cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr &&
           cblas_sgemm_compute != nullptr && sgemm_ != nullptr;
  }

 private:
  at::Tensor weight_;
  bool transposed_;
  int64_t max_rows_;
  int64_t k_ = 0, n_ = 0;
  at::Tensor packed_;
};

}  // namespace CPU_CAPABILITY
}  // namespace lstm_fused
