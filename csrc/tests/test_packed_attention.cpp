// Tests of the packed attention C++ API (csrc/packed_attention/packed_attention.h) without Python: the Philox
// draw against mmcore.ops._philox.philox_randint, one small causal segment against a dense computation, and
// an input error. The full comparison with the reference is tests/ops/test_packed_attention_cpp.py.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "check.h"
#include "packed_attention/packed_attention.h"

namespace pa = mmcore::packed_attention;

TEST_CASE(philox_matches_python_reference) {
  // python -c "import torch; from mmcore.ops._philox import philox_randint as r; print(int(r(SEED,
  // torch.tensor([COUNTER]))[0]))"
  EXPECT_EQ(pa::philox_randint(0, 0), uint32_t{1713891541});
  EXPECT_EQ(pa::philox_randint(0, 1), uint32_t{4175744164});
  EXPECT_EQ(pa::philox_randint(2024, 5), uint32_t{2261353116});
  EXPECT_EQ(pa::philox_randint(static_cast<uint64_t>(int64_t{-1}), 4294967303ull), uint32_t{3002214090});
  EXPECT_EQ(pa::philox_randint(123456789012ull, 1099511627787ull), uint32_t{2331806424});
  EXPECT_EQ(pa::philox_randint(9223372036854775807ull, static_cast<uint64_t>(int64_t{-3})), uint32_t{308254905});
  EXPECT_EQ(pa::dropout_threshold(0.5), uint64_t{2147483648});
}

TEST_CASE(causal_segment_matches_dense_attention) {
  // Segments of (Lq, Lk) = (3, 5) and (4, 2), causal bottom-right aligned, 2 query heads on 1 kv head.
  at::manual_seed(0);
  const at::Tensor q = at::randn({7, 2, 8}, at::kDouble), k = at::randn({7, 1, 8}, at::kDouble);
  const at::Tensor v = at::randn({7, 1, 8}, at::kDouble);
  const at::Tensor cq = at::tensor({0, 3, 7}, at::kInt), ck = at::tensor({0, 5, 7}, at::kInt);
  const double scale = 0.3;
  auto [out, lse] = pa::packed_attention_fwd_cpu(q, k, v, cq, ck, 4, 5, 1, std::nullopt, scale, 0.0, 0, 0);
  const int64_t q0[2] = {0, 3}, lq[2] = {3, 4}, k0[2] = {0, 5}, lk[2] = {5, 2};
  for (int s = 0; s < 2; ++s) {
    for (int64_t h = 0; h < 2; ++h) {
      const at::Tensor qs = q.narrow(0, q0[s], lq[s]).select(1, h), ks = k.narrow(0, k0[s], lk[s]).select(1, 0);
      const at::Tensor vs = v.narrow(0, k0[s], lk[s]).select(1, 0);
      const at::Tensor i = at::arange(lq[s], at::kLong).unsqueeze(1), j = at::arange(lk[s], at::kLong).unsqueeze(0);
      const at::Tensor scores = (qs.matmul(ks.t()) * scale).masked_fill(j > i + (lk[s] - lq[s]), -INFINITY);
      const at::Tensor ref_lse = scores.logsumexp(1);
      const at::Tensor ref = at::nan_to_num(at::softmax(scores, 1), 0.0).matmul(vs);
      EXPECT(at::allclose(out.narrow(0, q0[s], lq[s]).select(1, h), ref, 1e-12, 1e-12));
      for (int64_t r = 0; r < lq[s]; ++r) {
        const double want = ref_lse[r].item<double>();
        const double got = lse[h][q0[s] + r].item<double>();
        EXPECT(std::isinf(want) ? got == std::numeric_limits<double>::infinity() : std::abs(got - want) < 1e-5);
      }
    }
  }
  // segment 1 has Lq - Lk = 2 queries that see no key: zeros, lse +inf
  EXPECT(at::equal(out.narrow(0, 3, 2), at::zeros({2, 2, 8}, at::kDouble)));
}

TEST_CASE(packed_attention_rejects_bad_inputs) {
  const at::Tensor q = at::randn({4, 2, 8}), k = at::randn({4, 1, 8});
  const at::Tensor cu = at::tensor({0, 4}, at::kInt);
  EXPECT_THROWS(pa::packed_attention_fwd_cpu(q, k, k, cu, cu, 4, 4, 3, std::nullopt, 1.0, 0.0, 0, 0),
                c10::ValueError, "mode must be 0 (full), 1 (causal) or 2 (prefix)");
  EXPECT_THROWS(pa::packed_attention_fwd_cpu(q, k, k, cu.to(at::kLong), cu, 4, 4, 0, std::nullopt, 1.0, 0.0, 0, 0),
                c10::TypeError, "cu_seqlens_q must be int32");
}
