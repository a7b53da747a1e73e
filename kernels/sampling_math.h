// The arithmetic that kernels/sampling.cpp (the CPU specification) and kernels/sampling.cu (the
// CUDA implementation) share, written once for host and device so the two agree bit for bit:
// every floating-point operation is a single IEEE round-to-nearest step (no contraction into
// FMA, no approximate intrinsics), and every sum that decides a token is an integer sum, which
// no reduction order can change. Internal to the sampling kernels; not an API.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LORAD_SAMPLING_HD __host__ __device__ __forceinline__
#else
#define LORAD_SAMPLING_HD inline
#endif

namespace lorad::kernels::sampling_math {

// One rounding each. nvcc would fuse a * b + c into an FMA on the device; the _rn intrinsics are
// never fused. The host compiler must not contract either (kernels/CMakeLists.txt builds
// sampling.cpp with -ffp-contract=off; x86-64 without -mfma has no FMA to contract into).
LORAD_SAMPLING_HD float Mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
LORAD_SAMPLING_HD float Add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
LORAD_SAMPLING_HD float Sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
LORAD_SAMPLING_HD float Div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

LORAD_SAMPLING_HD uint32_t FloatBits(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  return u;
}
LORAD_SAMPLING_HD float BitsFloat(uint32_t u) {
  float x;
  memcpy(&x, &u, sizeof(x));
  return x;
}

// An unsigned key with the order of the floats: a < b (as floats) <=> Key(a) < Key(b). -0 is
// first made +0 (x + 0 does that under round-to-nearest) so the two zeros, equal as floats, get
// one key. NaN is not ordered; the kernels' callers never pass it.
LORAD_SAMPLING_HD uint32_t Key(float x) {
  const uint32_t u = FloatBits(Add(x, 0.0f));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
LORAD_SAMPLING_HD float KeyFloat(uint32_t key) {
  return BitsFloat((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// exp(x) for x <= 0, within 2 ulp of the true value; 0 below -87 (where exp(x) is no longer a
// normal float) and for NaN. Range reduction x = k ln2 + r (|r| <= ln2 / 2, Cody-Waite split of
// ln2 so k * kLn2Hi is exact), then the degree-7 Taylor polynomial of exp(r) (truncation error
// below 6e-9, under half an ulp), then scaling by 2^k through the exponent bits.
LORAD_SAMPLING_HD float ExpNonPositive(float x) {
  if (!(x >= -87.0f)) return 0.0f;
  if (x >= 0.0f) return 1.0f;
  constexpr float kLog2e = 1.44269502162933349609375f;
  constexpr float kLn2Hi = 0.693145751953125f;         // 0x3f317200: 15 significant bits
  constexpr float kLn2Lo = 1.428606765330187045e-06f;  // ln 2 - kLn2Hi
  // k = round-half-even(x * log2 e) in [-126, 0]; adding and subtracting 1.5 * 2^23 rounds a
  // float of magnitude below 2^22 to an integer in the current (nearest-even) rounding mode.
  constexpr float kRound = 12582912.0f;
  const float kf = Sub(Add(Mul(x, kLog2e), kRound), kRound);
  const float r = Sub(Sub(x, Mul(kf, kLn2Hi)), Mul(kf, kLn2Lo));
  float p = 1.0f / 5040.0f;
  p = Add(Mul(p, r), 1.0f / 720.0f);
  p = Add(Mul(p, r), 1.0f / 120.0f);
  p = Add(Mul(p, r), 1.0f / 24.0f);
  p = Add(Mul(p, r), 1.0f / 6.0f);
  p = Add(Mul(p, r), 0.5f);
  p = Add(Mul(p, r), 1.0f);
  p = Add(Mul(p, r), 1.0f);
  const int32_t k = static_cast<int32_t>(kf);  // exact: kf is an integer in [-126, 0]
  return Mul(p, BitsFloat(static_cast<uint32_t>(k + 127) << 23));
}

// Token masses are fixed-point: mass = floor(exp(z - max) * 2^kMassBits), the max token's mass is
// exactly 2^kMassBits. Integer sums of masses are exact in any order, which is what lets the GPU
// reduce in parallel and still pick the CPU's token. Tokens with exp(z - max) < 2^-40 get mass 0:
// they are never sampled and top-p counts them as nothing (at most vocab * 2^-40 of the mass).
// kSamplingMaxVocab (sampling.h) keeps a row's total below 2^63.
inline constexpr int kMassBits = 40;

LORAD_SAMPLING_HD uint64_t Mass(float z_minus_max) {
  // Multiplying by a power of two is exact; the conversion truncates (same on host and device).
  constexpr float kScale = static_cast<float>(uint64_t{1} << kMassBits);
  return static_cast<uint64_t>(Mul(ExpNonPositive(z_minus_max), kScale));
}

// HF's top-p removes a token when the ascending cumulative probability up to and including it is
// <= 1 - top_p; in masses: cumulative <= floor((1 - top_p) * total). Computed in double: both
// conversions and the product are single round-to-nearest steps on host and device alike.
LORAD_SAMPLING_HD uint64_t TopPThreshold(float top_p, uint64_t total) {
  const double q = 1.0 - static_cast<double>(top_p);
  const double t = q * static_cast<double>(static_cast<int64_t>(total));  // total < 2^63
  return t <= 0.0 ? 0 : static_cast<uint64_t>(t);  // truncation is floor for t >= 0
}

// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), as in
// Random123, cuRAND and PyTorch: a counter-based generator, so any (key, counter) is drawn
// independently of every other, in any order, on any device.
struct Philox4x32Out {
  uint32_t v[4];
};
LORAD_SAMPLING_HD Philox4x32Out Philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                              uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return {{c0, c1, c2, c3}};
}

// The 64 random bits of one row's draw: Philox keyed by the request's seed, counter = the step
// (tokens generated so far). Nothing else enters, so a seeded request draws the same bits
// whatever shares its batch and wherever its row is.
LORAD_SAMPLING_HD uint64_t DrawBits(uint64_t seed, uint64_t step) {
  const Philox4x32Out o =
      Philox4x32_10(static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32), 0u, 0u,
                    static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return (static_cast<uint64_t>(o.v[0]) << 32) | o.v[1];
}

// floor(bits * total / 2^64): a uniform integer in [0, total) from 64 uniform bits.
LORAD_SAMPLING_HD uint64_t ScaleDraw(uint64_t bits, uint64_t total) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(bits, total);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(bits) * total) >> 64);
#endif
}

}  // namespace lorad::kernels::sampling_math
