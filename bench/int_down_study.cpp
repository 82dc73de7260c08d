// Study (not built by setup.py, not product code): would an integer down projection pay off?
// Answer (2026-12-08): built into every CPU kernel variant, it did not (the op and the decode
// step took the same time; in the op the down rows cost what their bytes say): docs/RESULTS.md,
// "Where a decode step's time goes". This loop reads its rows in order with nothing else
// running, which is where its 1.3-1.6x comes from.
// Standalone: g++ -O3 -std=c++17 -ffp-contract=fast bench/int_down_study.cpp -o /tmp/int_down
// && /tmp/int_down  (needs a CPU with AVX-512 VNNI).
//
// Standalone microbenchmark (not product code): the single-token q4 down projection of one FFN
// call, fp32 (as quant_core.inc's AVX-512 path: tiles of 4 rows, y += h * scale * u + off) against
// an integer variant (per tile and block of 32 outputs, coefficients rounded to int8 with one
// scale, 4 rows' nibbles interleaved so one dpbusd adds the 4 neurons). Scales are fp32 here in
// both arms. Reports ns per neuron, in cache and from DRAM, and the relative difference of y.
#include <immintrin.h>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>
#include <algorithm>

// GCC 12's own AVX-512 intrinsics trip -Wmaybe-uninitialized (their `__Y = __Y` idiom).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

constexpr int D = 1536, NB = D / 32;

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))
void down_f32(float* y, const float* h, const uint8_t* data, const float* sc, int k) {
  for (int j = 0; j < k; j += 4) {
    const uint8_t* row[4]; const float* s[4];
    for (int r = 0; r < 4; ++r) {
      row[r] = data + (size_t)(j + r) * (D / 2);
      s[r] = sc + (size_t)(j + r) * NB;
    }
    for (int b = 0; b < NB; ++b) {
      float* yp = y + b * 32;
      __m512 y0 = _mm512_loadu_ps(yp), y1 = _mm512_loadu_ps(yp + 16);
      float o = 0;
      for (int r = 0; r < 4; ++r) o += h[j + r] * (-8.0f * s[r][b]);
      const __m512 ov = _mm512_set1_ps(o);
      y0 = _mm512_add_ps(y0, ov); y1 = _mm512_add_ps(y1, ov);
      for (int r = 0; r < 4; ++r) {
        const __m512i bb = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(row[r] + b * 16)));
        const __m512 cv = _mm512_set1_ps(h[j + r] * s[r][b]);
        const __m512i lo = _mm512_and_si512(bb, _mm512_set1_epi32(15));
        y0 = _mm512_fmadd_ps(cv, _mm512_cvtepi32_ps(lo), y0);
        y1 = _mm512_fmadd_ps(cv, _mm512_cvtepi32_ps(_mm512_srli_epi32(bb, 4)), y1);
      }
      _mm512_storeu_ps(yp, y0); _mm512_storeu_ps(yp + 16, y1);
    }
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))
void down_int(float* y, const float* h, const uint8_t* data, const float* sc, int k) {
  alignas(64) int32_t kpat[NB], ksum8[NB]; alignas(64) float S[NB];
  for (int j = 0; j < k; j += 4) {
    const uint8_t* row[4]; const float* s[4];
    for (int r = 0; r < 4; ++r) {
      row[r] = data + (size_t)(j + r) * (D / 2);
      s[r] = sc + (size_t)(j + r) * NB;
    }
    // coefficients of 16 blocks at a time: c_r = h_r * s_r, one int8 scale per block over the 4
    for (int b0 = 0; b0 < NB; b0 += 16) {
      __m512 c[4], amax = _mm512_setzero_ps();
      for (int r = 0; r < 4; ++r) {
        c[r] = _mm512_mul_ps(_mm512_set1_ps(h[j + r]), _mm512_loadu_ps(s[r] + b0));
        amax = _mm512_max_ps(amax, _mm512_abs_ps(c[r]));
      }
      const __mmask16 nz = _mm512_cmp_ps_mask(amax, _mm512_setzero_ps(), _CMP_GT_OQ);
      const __m512 inv = _mm512_maskz_div_ps(nz, _mm512_set1_ps(127.0f), amax);
      __m512i pat = _mm512_setzero_si512(), sum = _mm512_setzero_si512();
      for (int r = 0; r < 4; ++r) {
        const __m512i q = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(c[r], inv), 0));
        sum = _mm512_add_epi32(sum, q);
        const __m512i byte = _mm512_and_si512(q, _mm512_set1_epi32(0xFF));
        pat = _mm512_or_si512(pat, _mm512_slli_epi32(byte, 8 * r));
      }
      _mm512_storeu_si512(kpat + b0, pat);
      _mm512_storeu_si512(ksum8 + b0, _mm512_mullo_epi32(sum, _mm512_set1_epi32(-8)));
      _mm512_storeu_ps(S + b0, _mm512_mul_ps(amax, _mm512_set1_ps(1.0f / 127.0f)));
    }
    for (int b = 0; b < NB; ++b) {
      const __m128i a0 = _mm_loadu_si128((const __m128i*)(row[0] + b * 16));
      const __m128i a1 = _mm_loadu_si128((const __m128i*)(row[1] + b * 16));
      const __m128i a2 = _mm_loadu_si128((const __m128i*)(row[2] + b * 16));
      const __m128i a3 = _mm_loadu_si128((const __m128i*)(row[3] + b * 16));
      const __m128i l01 = _mm_unpacklo_epi8(a0, a1), h01 = _mm_unpackhi_epi8(a0, a1);
      const __m128i l23 = _mm_unpacklo_epi8(a2, a3), h23 = _mm_unpackhi_epi8(a2, a3);
      // bytes [u0 u1 u2 u3] of value j, j = 0..15 (low nibbles) / 16..31 (high nibbles)
      const __m256i q01 =
          _mm256_set_m128i(_mm_unpackhi_epi16(l01, l23), _mm_unpacklo_epi16(l01, l23));
      const __m256i q23 =
          _mm256_set_m128i(_mm_unpackhi_epi16(h01, h23), _mm_unpacklo_epi16(h01, h23));
      const __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(q01), q23, 1);
      const __m512i lo = _mm512_and_si512(z, _mm512_set1_epi8(0x0F));
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(z, 4), _mm512_set1_epi8(0x0F));
      const __m512i kp = _mm512_set1_epi32(kpat[b]), init = _mm512_set1_epi32(ksum8[b]);
      const __m512 Sv = _mm512_set1_ps(S[b]);
      float* yp = y + b * 32;
      const __m512 d0 = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(init, lo, kp));
      const __m512 d1 = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(init, hi, kp));
      _mm512_storeu_ps(yp, _mm512_fmadd_ps(d0, Sv, _mm512_loadu_ps(yp)));
      _mm512_storeu_ps(yp + 16, _mm512_fmadd_ps(d1, Sv, _mm512_loadu_ps(yp + 16)));
    }
  }
}

int main() {
  std::mt19937 g(0);
  std::uniform_int_distribution<int> ub(0, 255);
  std::normal_distribution<float> nd(0, 1);
  // 256 neurons: in L2; 21504 (8 layers of 30% of 8960): 18.6 MB, beyond L2, partly in L3
  for (int K : {256, 2688 * 8}) {
    std::vector<uint8_t> data((size_t)K * D / 2); for (auto& v : data) v = ub(g);
    std::vector<float> sc((size_t)K * NB); for (auto& v : sc) v = 0.01f * (1.0f + std::fabs(nd(g)));
    std::vector<float> h(K); for (auto& v : h) v = nd(g);
    std::vector<float> y1(D), y2(D);
    const int reps = K == 256 ? 4000 : 40;
    double best[2] = {1e30, 1e30};
    for (int rep = 0; rep < 5; ++rep)
      for (int arm = 0; arm < 2; ++arm) {
        auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < reps; ++i) {
          float* y = arm ? y2.data() : y1.data();
          std::fill(y, y + D, 0.0f);
          (arm ? down_int : down_f32)(y, h.data(), data.data(), sc.data(), K);
        }
        const auto dt = std::chrono::steady_clock::now() - t0;
        const double ns = std::chrono::duration<double, std::nano>(dt).count() / reps / K;
        best[arm] = std::min(best[arm], ns);
      }
    double num = 0, den = 0;
    for (int i = 0; i < D; ++i) { num += (y1[i] - y2[i]) * (y1[i] - y2[i]); den += y1[i] * y1[i]; }
    const double bytes = D / 2 + NB * 2;  // one q4 row with fp16 scales
    std::printf("K=%d: fp32 %.2f ns/neuron, int %.2f ns/neuron, ratio %.2fx; rel L2 diff %.2e; "
                "%.1f / %.1f GB/s of down bytes\n",
                K, best[0], best[1], best[0] / best[1], std::sqrt(num / den), bytes / best[0],
                bytes / best[1]);
  }
}
