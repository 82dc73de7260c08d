// Which AVX2 dot wins for the gate / up rows of a quantised gathered FFN at decode (T = 1):
//   (a) fp32 activations x weights converted to fp32 (cvtepi8_epi32 + cvtepi32_ps + FMA), or
//   (b) activations rounded to int8 per block of 32, integer dots (maddubs + madd), one fp32 FMA
//       per block (what csrc/cpu/quant_core.inc ships).
// Both read the same rows (q8 or q4, group 32, fp16 scales) of k kept neurons x 2 rows; the down
// projection (fp32 axpy in both) is left out as it is the same code. One thread, rows resident
// in memory (the working set is larger than the last-level cache), median of 50 passes.
//
//   g++ -O3 -mavx2 -mfma -mf16c -o /tmp/qdv csrc/bench/quant_dot_variants.cpp && /tmp/qdv
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

namespace {

constexpr int kD = 1536, kN = 8960, kB = 32;

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256i q4_block(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(b), _mm_srli_epi16(b, 4), 1);
  return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

template <int BITS>
inline __m256i load_block(const uint8_t* p) {
  if (BITS == 8) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm256_sub_epi8(q4_block(p), _mm256_set1_epi8(8));  // signed values for (a)
}

// (a): fp32 x, weights converted to fp32.
template <int BITS>
float dot_f32(const float* x, const uint8_t* w, const uint16_t* s) {
  constexpr int BB = BITS == 8 ? 32 : 16;
  __m256 acc = _mm256_setzero_ps();
  for (int b = 0; b < kD / kB; ++b) {
    const __m256i v = load_block<BITS>(w + b * BB);
    const __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
    __m256 g = _mm256_mul_ps(_mm256_loadu_ps(x + b * kB),
                             _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)));
    g = _mm256_fmadd_ps(_mm256_loadu_ps(x + b * kB + 8),
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), g);
    g = _mm256_fmadd_ps(_mm256_loadu_ps(x + b * kB + 16),
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), g);
    g = _mm256_fmadd_ps(_mm256_loadu_ps(x + b * kB + 24),
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), g);
    acc = _mm256_fmadd_ps(g, _mm256_set1_ps(_cvtsh_ss(s[b])), acc);
  }
  return hsum8(acc);
}

// (b): int8 x (per-block scale xs, block sums xsum), integer dots.
template <int BITS>
float dot_i8(const int8_t* xq, const float* xs, const int32_t* xsum, const uint8_t* w,
             const uint16_t* s) {
  constexpr int BB = BITS == 8 ? 32 : 16;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc = _mm256_setzero_ps();
  float tail = 0.0f;
  for (int b = 0; b < kD / kB; ++b) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * kB));
    const float sw = _cvtsh_ss(s[b]);
    __m256i p16;
    if (BITS == 8) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * BB));
      p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(v, v), _mm256_sign_epi8(xv, v));
    } else {
      p16 = _mm256_maddubs_epi16(q4_block(w + b * BB), xv);
      tail += -8.0f * sw * xs[b] * static_cast<float>(xsum[b]);
    }
    const __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
    acc = _mm256_fmadd_ps(f, _mm256_set1_ps(sw * xs[b]), acc);
  }
  return hsum8(acc) + tail;
}

template <int BITS>
void run(const char* name) {
  constexpr int BB = BITS == 8 ? 32 : 16;
  const int64_t row_bytes = kD / kB * BB, ng = kD / kB;
  constexpr int kCopies = 4;  // > last-level cache in all
  std::mt19937 rng(0);
  std::vector<std::vector<uint8_t>> data(kCopies, std::vector<uint8_t>(2LL * kN * row_bytes));
  std::vector<std::vector<uint16_t>> sc(kCopies, std::vector<uint16_t>(2LL * kN * ng, 0x2000));
  for (auto& v : data)
    for (auto& b : v) b = static_cast<uint8_t>(rng() & (BITS == 8 ? 0x7f : 0xff));
  std::vector<float> x(kD), xs(ng);
  std::vector<int8_t> xq(kD);
  std::vector<int32_t> xsum(ng, 0);
  for (int i = 0; i < kD; ++i) x[i] = static_cast<float>(rng() % 200) / 100.0f - 1.0f;
  for (int b = 0; b < ng; ++b) {
    xs[b] = 1.0f / 127.0f;
    for (int i = 0; i < kB; ++i) xq[b * kB + i] = static_cast<int8_t>(x[b * kB + i] * 127.0f);
  }
  for (double keep : {0.3, 1.0}) {
    const int k = static_cast<int>(keep * kN);
    std::vector<int> idx(kN);
    for (int i = 0; i < kN; ++i) idx[i] = i;
    std::shuffle(idx.begin(), idx.end(), rng);
    idx.resize(k);
    std::sort(idx.begin(), idx.end());
    double best[2] = {1e30, 1e30};
    std::vector<double> times[2];
    volatile float sink = 0.0f;
    for (int pass = 0; pass < 50; ++pass) {
      for (int variant = 0; variant < 2; ++variant) {
        const int c = pass % kCopies;
        const auto t0 = std::chrono::steady_clock::now();
        float total = 0.0f;
        for (int j = 0; j < k; ++j) {
          for (int r = 0; r < 2; ++r) {
            const int64_t row = 2LL * idx[j] + r;
            const uint8_t* w = data[c].data() + row * row_bytes;
            const uint16_t* s = sc[c].data() + row * ng;
            total += variant == 0 ? dot_f32<BITS>(x.data(), w, s)
                                  : dot_i8<BITS>(xq.data(), xs.data(), xsum.data(), w, s);
          }
        }
        sink = sink + total;
        times[variant].push_back(
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                .count());
      }
    }
    for (int v = 0; v < 2; ++v) {
      std::sort(times[v].begin(), times[v].end());
      best[v] = times[v][times[v].size() / 2];
    }
    const double gb = 2.0 * k * (row_bytes + 2 * ng) / 1e9;
    std::printf("%s keep %.1f (k=%d, 2 rows/neuron): (a) fp32 %.3f ms %.1f GB/s | (b) int8 %.3f ms "
                "%.1f GB/s | (a)/(b) %.2f\n",
                name, keep, k, best[0], gb / (best[0] * 1e-3), best[1], gb / (best[1] * 1e-3),
                best[0] / best[1]);
  }
}

}  // namespace

int main() {
  run<8>("q8");
  run<4>("q4");
  return 0;
}
