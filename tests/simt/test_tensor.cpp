// The intrinsics header csrc/cuda/mma.cuh in emulation: each mma variant against a plain matrix
// product on random inputs, each ldmatrix variant, cp.async deferral, the conversions. The
// fragments are built here from the PTX ISA's layout tables, independently of the emulator's
// code, so a wrong index on either side fails.
#include "../../csrc/cuda/mma.cuh"
#include "check.h"

#include <algorithm>
#include <cmath>

using namespace lstm_fused;

namespace {

bool contains(const char* haystack, const char* needle) { return std::strstr(haystack, needle) != nullptr; }

float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
// Inputs exactly representable in bf16 / fp16 / tf32: k/64 for small random k, so a product
// matrix is exact in double and the check can be tight.
float random_grid_value() { return static_cast<float>(static_cast<int>(check::rng()() % 257) - 128) / 64.0f; }
uint16_t bf16_of(float x) { return static_cast<uint16_t>(float_to_bits(x) >> 16); }  // exact for grid values
uint16_t half_of(float x) {
  _Float16 h = static_cast<_Float16>(x);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}

enum Kind { kBF16, kF16, kTF32 };

struct MmaProblem {
  float a[16][16];  // M x K (K = 8 for tf32)
  float b[16][8];   // K x N
  float c[16][8];
};

// Per-lane fragments, from the PTX ISA (Matrix Fragments for mma.m16n8k16 with floating point
// type; for mma.m16n8k8 .tf32). groupID = lane >> 2, threadID_in_group = lane % 4.
struct Fragments {
  uint32_t a[32][4], b[32][2];
  float c[32][4];
};
uint32_t pack16(uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16); }
Fragments fragments_of(const MmaProblem& p, Kind kind) {
  Fragments f{};
  auto h = [kind](float x) { return kind == kBF16 ? bf16_of(x) : half_of(x); };
  for (int lane = 0; lane < 32; ++lane) {
    const int group = lane >> 2, tig = lane % 4;
    if (kind == kTF32) {
      // a0:(g, t) a1:(g+8, t) a2:(g, t+4) a3:(g+8, t+4); b0:(t, g) b1:(t+4, g)
      f.a[lane][0] = float_to_bits(p.a[group][tig]);
      f.a[lane][1] = float_to_bits(p.a[group + 8][tig]);
      f.a[lane][2] = float_to_bits(p.a[group][tig + 4]);
      f.a[lane][3] = float_to_bits(p.a[group + 8][tig + 4]);
      f.b[lane][0] = float_to_bits(p.b[tig][group]);
      f.b[lane][1] = float_to_bits(p.b[tig + 4][group]);
    } else {
      // row = groupID for a0,a1,a4,a5 and groupID+8 for a2,a3,a6,a7;
      // col = threadID_in_group*2 + (i & 1) for a0..a3, + 8 for a4..a7
      float a_elem[8];
      for (int i = 0; i < 8; ++i) {
        const int row = (i == 0 || i == 1 || i == 4 || i == 5) ? group : group + 8;
        const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
        a_elem[i] = p.a[row][col];
      }
      for (int r = 0; r < 4; ++r) f.a[lane][r] = pack16(h(a_elem[2 * r]), h(a_elem[2 * r + 1]));
      // b: row = threadID_in_group*2 + (i & 1) for b0,b1, + 8 for b2,b3; col = groupID
      float b_elem[4];
      for (int i = 0; i < 4; ++i) b_elem[i] = p.b[tig * 2 + (i & 1) + (i >= 2 ? 8 : 0)][group];
      f.b[lane][0] = pack16(h(b_elem[0]), h(b_elem[1]));
      f.b[lane][1] = pack16(h(b_elem[2]), h(b_elem[3]));
    }
    // c/d: row = groupID for c0,c1, groupID+8 for c2,c3; col = threadID_in_group*2 + (i & 1)
    for (int i = 0; i < 4; ++i) f.c[lane][i] = p.c[i < 2 ? group : group + 8][tig * 2 + (i & 1)];
  }
  return f;
}

__global__ void run_mma(const Fragments* in, float* d_out, int kind) {
  const unsigned lane = threadIdx.x % 32;
  uint32_t a[4], b[2];
  float c[4], d[4];
  for (int i = 0; i < 4; ++i) a[i] = in->a[lane][i];
  for (int i = 0; i < 2; ++i) b[i] = in->b[lane][i];
  for (int i = 0; i < 4; ++i) c[i] = in->c[lane][i];
  if (kind == kBF16) tc::mma_m16n8k16_bf16(d, a, b, c);
  if (kind == kF16) tc::mma_m16n8k16_f16(d, a, b, c);
  if (kind == kTF32) tc::mma_m16n8k8_tf32(d, a, b, c);
  // accumulate in place too (d aliasing c), as kernels do
  if (kind == kBF16) tc::mma_m16n8k16_bf16(c, a, b, c);
  if (kind == kF16) tc::mma_m16n8k16_f16(c, a, b, c);
  if (kind == kTF32) tc::mma_m16n8k8_tf32(c, a, b, c);
  for (int i = 0; i < 4; ++i) {
    d_out[(threadIdx.x / 32) * 256 + lane * 8 + i] = d[i];
    d_out[(threadIdx.x / 32) * 256 + lane * 8 + 4 + i] = c[i];
  }
}

void check_mma(Kind kind, const char* name) {
  const int K = kind == kTF32 ? 8 : 16;
  for (int trial = 0; trial < 20; ++trial) {
    MmaProblem p{};
    for (auto& row : p.a)
      for (int k = 0; k < K; ++k) row[k] = random_grid_value();
    for (int k = 0; k < K; ++k)
      for (auto& x : p.b[k]) x = random_grid_value();
    for (auto& row : p.c)
      for (auto& x : row) x = random_grid_value() * 3.0f;
    Fragments f = fragments_of(p, kind);
    std::vector<float> out(2 * 256);
    CHECK_OK(simt::launch(name, run_mma, dim3(1), dim3(64), 0, &f, out.data(), static_cast<int>(kind)));
    for (int w = 0; w < 2; ++w)
      for (int lane = 0; lane < 32; ++lane)
        for (int i = 0; i < 4; ++i) {
          const int row = (i < 2 ? lane >> 2 : (lane >> 2) + 8), col = (lane % 4) * 2 + (i & 1);
          double expect = p.c[row][col];
          for (int k = 0; k < K; ++k) expect += static_cast<double>(p.a[row][k]) * p.b[k][col];
          const float once = out[static_cast<size_t>(w * 256 + lane * 8 + i)];
          const float twice = out[static_cast<size_t>(w * 256 + lane * 8 + 4 + i)];
          CHECK_MSG(once == static_cast<float>(expect), "%s lane %d d%d: %g vs %g", name, lane, i, once, expect);
          CHECK_MSG(twice == static_cast<float>(expect), "%s in place lane %d d%d: %g vs %g", name, lane, i, twice,
                    expect);
        }
  }
}

TEST(mma_m16n8k16_bf16_matches_matmul) { check_mma(kBF16, "mma_bf16"); }
TEST(mma_m16n8k16_f16_matches_matmul) { check_mma(kF16, "mma_f16"); }
TEST(mma_m16n8k8_tf32_matches_matmul) { check_mma(kTF32, "mma_tf32"); }

// tf32 operands: only the top 19 bits of each register count.
TEST(mma_tf32_ignores_low_bits) {
  MmaProblem p{};
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < 8; ++k) p.a[r][k] = random_grid_value();
  for (int k = 0; k < 8; ++k)
    for (int n = 0; n < 8; ++n) p.b[k][n] = random_grid_value();
  Fragments f = fragments_of(p, kTF32);
  Fragments noisy = f;
  for (auto& lane : noisy.a)
    for (auto& r : lane) r |= static_cast<uint32_t>(check::rng()() & 0x1fffu);
  for (auto& lane : noisy.b)
    for (auto& r : lane) r |= static_cast<uint32_t>(check::rng()() & 0x1fffu);
  std::vector<float> clean_out(512), noisy_out(512);
  CHECK_OK(simt::launch("mma_tf32", run_mma, dim3(1), dim3(32), 0, &f, clean_out.data(), static_cast<int>(kTF32)));
  CHECK_OK(simt::launch("mma_tf32", run_mma, dim3(1), dim3(32), 0, &noisy, noisy_out.data(), static_cast<int>(kTF32)));
  CHECK(clean_out == noisy_out);
}

// An mma needs the whole warp: a warp with an exited lane is a broken contract.
__global__ void mma_partial_warp(const Fragments* in, float* out) {
  if (threadIdx.x == 3) return;
  run_mma(in, out, kBF16);
}
TEST(mma_needs_all_lanes) {
  Fragments f{};
  std::vector<float> out(256);
  CHECK(simt::launch("mma_partial_warp", mma_partial_warp, dim3(1), dim3(32), 0, &f, out.data()) ==
        simt::Error::launch_failure);
  CHECK_MSG(contains(simt::last_error_message(), "exited"), "%s", simt::last_error_message());
}

// ---- ldmatrix: lanes 8j..8j+7 give the rows of matrix j
template <int N, bool Trans>
__global__ void run_ldmatrix(const uint16_t* matrices, const int* row_of_lane, uint32_t* out, int misalign) {
  // N matrices of 8x8 b16 in shared memory, rows padded to 24 elements (48 bytes, 16-aligned)
  __shared__ __align__(16) uint16_t tile[4][8][24];
  const unsigned lane = threadIdx.x;
  if (lane < 8)
    for (int j = 0; j < N; ++j)
      for (int c = 0; c < 8; ++c) tile[j][lane][c] = matrices[(j * 8 + lane) * 8 + c];
  __syncwarp();
  // each lane names the row it serves; out-of-use lanes (x1: 8-31, x2: 16-31) give junk
  const int m = static_cast<int>(lane / 8);
  const void* address = m < N ? static_cast<const void*>(&tile[m][row_of_lane[lane]][0])
                              : static_cast<const void*>(reinterpret_cast<const char*>(&tile[0][0][0]) + 2);
  if (misalign && lane == 5) address = reinterpret_cast<const char*>(address) + 8;
  uint32_t r[N];
  if (N == 1 && !Trans) tc::ldmatrix_x1(reinterpret_cast<uint32_t(&)[1]>(r), address);
  if (N == 2 && !Trans) tc::ldmatrix_x2(reinterpret_cast<uint32_t(&)[2]>(r), address);
  if (N == 4 && !Trans) tc::ldmatrix_x4(reinterpret_cast<uint32_t(&)[4]>(r), address);
  if (N == 1 && Trans) tc::ldmatrix_x1_trans(reinterpret_cast<uint32_t(&)[1]>(r), address);
  if (N == 2 && Trans) tc::ldmatrix_x2_trans(reinterpret_cast<uint32_t(&)[2]>(r), address);
  if (N == 4 && Trans) tc::ldmatrix_x4_trans(reinterpret_cast<uint32_t(&)[4]>(r), address);
  for (int j = 0; j < N; ++j) out[lane * 4 + j] = r[j];
}

template <int N, bool Trans>
void check_ldmatrix() {
  std::vector<uint16_t> matrices(4 * 64);
  for (auto& x : matrices) x = static_cast<uint16_t>(check::rng()());
  // lanes of matrix j give its rows in a shuffled order: lane 8j+i gives row perm[i]
  std::vector<int> row_of_lane(32);
  std::vector<int> perm = {0, 1, 2, 3, 4, 5, 6, 7};
  std::shuffle(perm.begin(), perm.end(), check::rng());
  for (int lane = 0; lane < 32; ++lane) row_of_lane[static_cast<size_t>(lane)] = perm[static_cast<size_t>(lane % 8)];
  std::vector<uint32_t> out(32 * 4, 0);
  CHECK_OK(simt::launch("run_ldmatrix", run_ldmatrix<N, Trans>, dim3(1), dim3(32), 0, matrices.data(),
                        row_of_lane.data(), out.data(), 0));
  // the address from lane 8j+i is row i of matrix j; it holds source row perm[i]
  auto element = [&](int j, int row, int col) {
    return matrices[static_cast<size_t>((j * 8 + perm[static_cast<size_t>(row)]) * 8 + col)];
  };
  for (int lane = 0; lane < 32; ++lane)
    for (int j = 0; j < N; ++j) {
      const int g = lane / 4, t = lane % 4;
      const uint32_t expect = Trans ? pack16(element(j, 2 * t, g), element(j, 2 * t + 1, g))
                                    : pack16(element(j, g, 2 * t), element(j, g, 2 * t + 1));
      CHECK_MSG(out[static_cast<size_t>(lane * 4 + j)] == expect, "x%d%s lane %d reg %d", N, Trans ? ".trans" : "",
                lane, j);
    }
}
TEST(ldmatrix_x1) { check_ldmatrix<1, false>(); }
TEST(ldmatrix_x2) { check_ldmatrix<2, false>(); }
TEST(ldmatrix_x4) { check_ldmatrix<4, false>(); }
TEST(ldmatrix_x1_trans) { check_ldmatrix<1, true>(); }
TEST(ldmatrix_x2_trans) { check_ldmatrix<2, true>(); }
TEST(ldmatrix_x4_trans) { check_ldmatrix<4, true>(); }

TEST(ldmatrix_misaligned_is_reported) {
  std::vector<uint16_t> matrices(4 * 64, 1);
  std::vector<int> rows(32, 0);
  std::vector<uint32_t> out(128);
  CHECK(simt::launch("run_ldmatrix", run_ldmatrix<4, false>, dim3(1), dim3(32), 0, matrices.data(), rows.data(),
                     out.data(), 1) == simt::Error::launch_failure);
  CHECK_MSG(contains(simt::last_error_message(), "16-byte aligned"), "%s", simt::last_error_message());
}

// An x4 load of a row-major 16x16 tile, matrices ordered (rows 0-7, cols 0-7), (8-15, 0-7),
// (0-7, 8-15), (8-15, 8-15), gives the A operand of m16n8k16; a .trans x2 load of a row-major
// K x N (16 x 8) tile gives B. Together with an mma: D = A B + C from shared memory.
__global__ void ldmatrix_then_mma(const uint16_t* a_rowmajor, const uint16_t* b_rowmajor, float* d_out) {
  __shared__ __align__(16) uint16_t a[16][16 + 8];
  __shared__ __align__(16) uint16_t b[16][8 + 8];
  const unsigned lane = threadIdx.x;
  for (int i = static_cast<int>(lane); i < 256; i += 32) a[i / 16][i % 16] = a_rowmajor[i];
  for (int i = static_cast<int>(lane); i < 128; i += 32) b[i / 8][i % 8] = b_rowmajor[i];
  __syncwarp();
  uint32_t af[4], bf[2];
  const int m = static_cast<int>(lane / 8), r = static_cast<int>(lane % 8);
  tc::ldmatrix_x4(af, &a[r + 8 * (m % 2)][8 * (m / 2)]);
  tc::ldmatrix_x2_trans(bf, &b[r + 8 * (m % 2)][0]);
  float c[4] = {0, 0, 0, 0}, d[4];
  tc::mma_m16n8k16_bf16(d, af, bf, c);
  for (int i = 0; i < 4; ++i) d_out[lane * 4 + i] = d[i];
}
TEST(ldmatrix_feeds_mma) {
  float a[16][16], b[16][8];
  std::vector<uint16_t> a16(256), b16(128);
  for (int i = 0; i < 256; ++i) a16[static_cast<size_t>(i)] = bf16_of(a[i / 16][i % 16] = random_grid_value());
  for (int i = 0; i < 128; ++i) b16[static_cast<size_t>(i)] = bf16_of(b[i / 8][i % 8] = random_grid_value());
  std::vector<float> out(128);
  CHECK_OK(simt::launch("ldmatrix_then_mma", ldmatrix_then_mma, dim3(1), dim3(32), 0, a16.data(), b16.data(), out.data()));
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      const int row = (i < 2 ? lane / 4 : lane / 4 + 8), col = (lane % 4) * 2 + (i & 1);
      double expect = 0;
      for (int k = 0; k < 16; ++k) expect += static_cast<double>(a[row][k]) * b[k][col];
      CHECK(out[static_cast<size_t>(lane * 4 + i)] == static_cast<float>(expect));
    }
}

// ---- cp.async: a group's copies are visible only after a wait lets it complete
__global__ void cp_async_groups(const float* src, float* seen) {
  __shared__ __align__(16) float s[3][64];
  const unsigned t = threadIdx.x;  // 16 threads, 16 bytes (4 floats) each per group
  for (int g = 0; g < 3; ++g)
    for (int i = 0; i < 4; ++i) s[g][t * 4 + i] = -1.0f;
  __syncthreads();
  tc::cp_async_16(&s[0][t * 4], src + t * 4);
  tc::cp_async_commit();
  tc::cp_async_8(&s[1][t * 4], src + 64 + t * 4);
  tc::cp_async_8(&s[1][t * 4 + 2], src + 64 + t * 4 + 2);
  tc::cp_async_commit();
  for (int i = 0; i < 4; ++i) tc::cp_async_4(&s[2][t * 4 + i], src + 128 + t * 4 + i);
  tc::cp_async_commit();
  seen[t] = s[0][t * 4];  // before any wait: stale
  tc::cp_async_wait<2>();  // the oldest group has landed, two may still be in flight
  seen[16 + t] = s[0][t * 4];
  seen[32 + t] = s[1][t * 4];
  tc::cp_async_wait<0>();
  __syncthreads();
  for (int g = 0; g < 3; ++g) seen[48 + g * 16 + t] = s[g][((t + 1) % 16) * 4 + 3];  // another thread's copy
}
TEST(cp_async_lands_at_wait) {
  std::vector<float> src(192), seen(96, 0.0f);
  for (auto& x : src) x = random_grid_value() + 10.0f;  // never -1
  CHECK_OK(simt::launch("cp_async_groups", cp_async_groups, dim3(1), dim3(16), 0, src.data(), seen.data()));
  for (int t = 0; t < 16; ++t) {
    CHECK(seen[static_cast<size_t>(t)] == -1.0f);
    CHECK(seen[static_cast<size_t>(16 + t)] == src[static_cast<size_t>(t * 4)]);
    CHECK(seen[static_cast<size_t>(32 + t)] == -1.0f);
    for (int g = 0; g < 3; ++g)
      CHECK(seen[static_cast<size_t>(48 + g * 16 + t)] == src[static_cast<size_t>(g * 64 + ((t + 1) % 16) * 4 + 3)]);
  }
}

__global__ void cp_async_misaligned(const float* src) {
  __shared__ __align__(16) float s[8];
  tc::cp_async_16(&s[1], src);
  tc::cp_async_commit();
  tc::cp_async_wait<0>();
}
TEST(cp_async_misaligned_is_reported) {
  std::vector<float> src(8);
  CHECK(simt::launch("cp_async_misaligned", cp_async_misaligned, dim3(1), dim3(1), 0, src.data()) ==
        simt::Error::launch_failure);
  CHECK_MSG(contains(simt::last_error_message(), "misaligned"), "%s", simt::last_error_message());
}

// tc::dynamic_shared<T>() is the launch's dynamic shared memory
__global__ void dynamic_shared_alias(int* same) {
  same[0] = tc::dynamic_shared<float>() == simt::dynamic_shared_memory() &&
            reinterpret_cast<uintptr_t>(tc::dynamic_shared<double>()) % 16 == 0;
}
TEST(dynamic_shared_helper) {
  int same = 0;
  CHECK_OK(simt::launch("dynamic_shared_alias", dynamic_shared_alias, dim3(1), dim3(1), 256, &same));
  CHECK(same == 1);
}

// ---- conversions
double bf16_value(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }
// nearest of the representable neighbours, ties to even (checked by search, not by bit tricks)
template <class ToValue>
bool is_nearest_even(double x, uint16_t got, ToValue value) {
  const double v = value(got);
  if (std::isnan(x)) return std::isnan(v);
  if (std::isinf(v))  // overflow: from the largest finite value plus half an ulp on (ties: odd max)
    return std::fabs(x) >= std::ldexp(1.0, 128) - std::ldexp(1.0, 119) && std::signbit(v) == std::signbit(x);
  const uint16_t below = static_cast<uint16_t>(got - 1), above = static_cast<uint16_t>(got + 1);
  for (uint16_t other : {below, above}) {
    const double o = value(other);
    if (std::isnan(o) || (std::signbit(o) != std::signbit(v) && o != 0 && v != 0)) continue;
    if (std::fabs(o - x) < std::fabs(v - x)) return false;
    if (std::fabs(o - x) == std::fabs(v - x) && (got & 1u)) return false;
  }
  return true;
}
TEST(pack_bf16x2_rounds_to_nearest_even) {
  for (int i = 0; i < 20000; ++i) {
    float lo = bits_to_float(static_cast<uint32_t>(check::rng()()));
    float hi = static_cast<float>(std::ldexp(static_cast<double>(check::rng()() % 100000) - 50000.0, -7));
    if (i % 5 == 0) lo = bits_to_float((float_to_bits(hi) & 0xffff0000u) | 0x8000u);  // exact ties
    if (!std::isfinite(lo)) continue;
    const uint32_t p = tc::pack_bf16x2(lo, hi);
    CHECK_MSG(is_nearest_even(lo, static_cast<uint16_t>(p), bf16_value), "lo %a -> %04x", lo, p & 0xffffu);
    CHECK_MSG(is_nearest_even(hi, static_cast<uint16_t>(p >> 16), bf16_value), "hi %a -> %04x", hi, p >> 16);
  }
  CHECK(std::isnan(bf16_value(static_cast<uint16_t>(tc::pack_bf16x2(NAN, 0.0f)))));
}
TEST(pack_half2_matches_float16_conversion) {
  for (int i = 0; i < 20000; ++i) {
    // magnitudes from subnormal to overflow
    const float lo = static_cast<float>(std::ldexp(static_cast<double>(check::rng()() % 2000000) - 1000000.0,
                                                   static_cast<int>(check::rng()() % 44) - 40));
    const float hi = bits_to_float(static_cast<uint32_t>(check::rng()()));
    const uint32_t p = tc::pack_half2(lo, hi);
    CHECK_MSG(static_cast<uint16_t>(p) == half_of(lo), "lo %a -> %04x vs %04x", lo, p & 0xffffu, half_of(lo));
    if (!std::isnan(hi)) CHECK_MSG(static_cast<uint16_t>(p >> 16) == half_of(hi), "hi %a", hi);
  }
}
TEST(to_tf32_rounds_to_nearest_away) {
  for (int i = 0; i < 20000; ++i) {
    float x = bits_to_float(static_cast<uint32_t>(check::rng()()));
    if (i % 4 == 0) x = bits_to_float((float_to_bits(x) & 0xffffe000u) | 0x1000u);  // exact ties
    if (!std::isfinite(x)) continue;
    const uint32_t r = tc::to_tf32(x);
    CHECK((r & 0x1fffu) == 0);
    const double got = bits_to_float(r);
    if (std::isinf(got)) {  // overflow from the largest tf32 plus half an ulp (ties away)
      CHECK_MSG(std::fabs(x) >= std::ldexp(1.0, 128) - std::ldexp(1.0, 116), "%a -> inf", x);
      continue;
    }
    if (x == 0) {
      CHECK(got == 0);
      continue;
    }
    const double step = std::max(std::ldexp(1.0, std::ilogb(x) - 10), std::ldexp(1.0, -136));
    const double err = std::fabs(got - static_cast<double>(x));
    CHECK_MSG(err <= step / 2, "%a -> %a", x, got);
    if (err == step / 2) CHECK_MSG(std::fabs(got) > std::fabs(x), "tie %a -> %a not away from zero", x, got);
  }
  CHECK(std::isnan(bits_to_float(tc::to_tf32(NAN))));
}

}  // namespace

TEST_MAIN()
