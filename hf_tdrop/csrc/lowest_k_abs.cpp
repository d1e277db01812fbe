// Exact per-row selection of the k smallest |w| of a float32 matrix, for targeted dropout's weight
// mode on CPU. Plain C ABI (called through ctypes), no torch headers, OpenMP over rows.
//
// The selection is the one of hf_tdrop.masking.lowest_k_bracketed, bit for bit: |w| is ranked by
// the key (bits of |w| as float32) << 32 | column, so ties at a value go to the lowest column, and
// the result is a mask with exactly k entries per row. With a bracket (per-row bounds from the
// previous call) a row is counted against it and only the few values inside it are sorted; rows
// where the bracket does not hold, and calls without one, use a partial selection of the row.
// Every row also gets a new bracket, placed `margin` ranks on each side of its k-th value, by the
// same rules as the torch implementation.
//
// Rows are counted and written 16 entries at a time (SSE2 on x86-64, plain C++ elsewhere).
// Strided rows (the [n_out, fan_in] view of a [fan_in, n_out] weight) are walked in blocks of 16
// adjacent rows so that memory is read and written in storage order.

#include <algorithm>
#include <atomic>
#include <new>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__SSE2__) && !defined(TDROP_PORTABLE)
#define TDROP_SSE2 1
#include <emmintrin.h>
#endif

namespace {

inline uint32_t abs_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u & 0x7FFFFFFFu;  // |x| (and -0.0 -> +0.0); for non-negative floats the bits order like the values
}

inline float bits_value(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

inline uint64_t make_key(uint32_t bits, int64_t col) { return (uint64_t(bits) << 32) | uint64_t(col); }

inline float key_value(uint64_t key) { return bits_value(uint32_t(key >> 32)); }

// Widest band a bracket may hold for the row to count as bracketed (masking.lowest_k_bracketed's rule).
inline int64_t band_limit(int64_t margin) { return 4 * margin + 16; }

struct Params {
  const float* w;
  int64_t rows, n, rs, cs;
  int64_t k;
  const float* lower;  // null: no bracket
  const float* upper;
  int64_t margin;
  uint8_t* out;
  int64_t ors, ocs;
  float* new_lower;
  float* new_upper;
};

// The k-th key of a row (1-based k) and the values `margin` ranks around it, by partial selection
// of the whole row (keys: scratch of n entries, filled here).
uint64_t select_full(const Params& p, int64_t r, std::vector<uint64_t>& keys) {
  const float* row = p.w + r * p.rs;
  for (int64_t j = 0; j < p.n; ++j) keys[j] = make_key(abs_bits(row[j * p.cs]), j);
  const int64_t kth = p.k - 1;
  const int64_t lo = std::max<int64_t>(kth - p.margin, 0), hi = std::min<int64_t>(kth + p.margin, p.n - 1);
  auto b = keys.begin();
  std::nth_element(b, b + hi, b + p.n);
  const uint64_t hi_key = keys[hi];
  std::nth_element(b, b + kth, b + hi);  // ranks < hi are now in [0, hi)
  const uint64_t kth_key = (kth == hi) ? hi_key : keys[kth];
  uint64_t lo_key = kth_key;
  if (lo < kth) {
    std::nth_element(b, b + lo, b + kth);
    lo_key = keys[lo];
  }
  p.new_lower[r] = key_value(lo_key);
  p.new_upper[r] = key_value(hi_key);
  return kth_key;
}

// Bracketed selection of a row whose band (values with lower <= |w| <= upper) was collected:
// returns false when the bracket does not hold (the caller then selects the full row).
bool select_in_band(const Params& p, int64_t r, int64_t below, int64_t upto, int64_t count,
                    int64_t limit, uint64_t* band, uint64_t* kth_key) {
  const int64_t width = upto - below;
  if (!(below < p.k && upto >= p.k && width <= limit && count == width)) return false;
  std::sort(band, band + width);
  const int64_t need = p.k - below;  // 1 <= need <= width
  *kth_key = band[need - 1];
  const float kth = key_value(*kth_key);
  const int64_t lo_idx = need - 1 - p.margin, hi_idx = need - 1 + p.margin;
  const bool has_lo = lo_idx >= 0, has_hi = hi_idx < width;
  float lo_val = key_value(band[std::clamp<int64_t>(lo_idx, 0, width - 1)]);
  float hi_val = key_value(band[std::clamp<int64_t>(hi_idx, 0, width - 1)]);
  // the band only holds values inside the old bracket: when the k-th value moved towards one of its
  // ends, mirror the other side's spread (in value) so the bracket follows the drift
  if (!has_lo) lo_val = has_hi ? 2.0f * kth - hi_val : p.lower[r];
  if (!has_hi) hi_val = has_lo ? 2.0f * kth - lo_val : p.upper[r];
  p.new_lower[r] = std::min(lo_val, kth);
  p.new_upper[r] = std::max(hi_val, kth);
  return true;
}

// Sixteen lanes at a time: 16 consecutive entries of one row (a contiguous row, bounds broadcast)
// or entry j of 16 adjacent rows (bounds per lane). count16 adds each lane's "below lower" and "at or
// below upper" counts and returns the lanes inside [lower, upper] as a bit mask; select16 writes
// key(|w|, column) <= k-th key for each lane as a 0/1 byte. SSE2 on x86-64, plain C++ elsewhere:
// the same comparisons, so the same results (TDROP_PORTABLE forces the plain version, for tests).
#if TDROP_SSE2
struct Lanes16 {
  __m128 lo[4], hi[4];
  __m128i below[4], upto[4], kbits[4], kcol1[4];

  void set_bounds(const float* lower, const float* upper, bool per_lane) {
    for (int q = 0; q < 4; ++q) {
      lo[q] = per_lane ? _mm_loadu_ps(lower + 4 * q) : _mm_set1_ps(*lower);
      hi[q] = per_lane ? _mm_loadu_ps(upper + 4 * q) : _mm_set1_ps(*upper);
      below[q] = upto[q] = _mm_setzero_si128();
    }
  }
  uint32_t count16(const float* x) {
    const __m128 abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7FFFFFFF));
    uint32_t in_band = 0;
    for (int q = 0; q < 4; ++q) {
      const __m128 a = _mm_and_ps(_mm_loadu_ps(x + 4 * q), abs_mask);
      const __m128 lt = _mm_cmplt_ps(a, lo[q]), le = _mm_cmple_ps(a, hi[q]);
      below[q] = _mm_sub_epi32(below[q], _mm_castps_si128(lt));  // a true compare is -1
      upto[q] = _mm_sub_epi32(upto[q], _mm_castps_si128(le));
      in_band |= uint32_t(_mm_movemask_ps(_mm_andnot_ps(lt, le))) << (4 * q);
    }
    return in_band;
  }
  void counts(int32_t* below_out, int32_t* upto_out) const {
    for (int q = 0; q < 4; ++q) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(below_out + 4 * q), below[q]);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(upto_out + 4 * q), upto[q]);
    }
  }
  // kth keys: one per lane (per_lane) or one for all; columns start at col0 (+ lane when !per_lane)
  void set_kth(const uint32_t* bits, const int32_t* col, bool per_lane) {
    for (int q = 0; q < 4; ++q) {
      kbits[q] = per_lane ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(bits + 4 * q)) : _mm_set1_epi32(int32_t(*bits));
      const __m128i c = per_lane ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(col + 4 * q)) : _mm_set1_epi32(*col);
      kcol1[q] = _mm_add_epi32(c, _mm_set1_epi32(1));
    }
  }
  void select16(const float* x, int32_t col0, bool per_lane, uint8_t* out) const {
    const __m128i abs_mask = _mm_set1_epi32(0x7FFFFFFF);
    __m128i t[4];
    for (int q = 0; q < 4; ++q) {
      // |w| bits are below 2**31: signed 32-bit compares order them correctly
      const __m128i bits = _mm_and_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 4 * q)), abs_mask);
      const __m128i cols = per_lane ? _mm_set1_epi32(col0) : _mm_add_epi32(_mm_set1_epi32(col0 + 4 * q), _mm_set_epi32(3, 2, 1, 0));
      const __m128i lt = _mm_cmplt_epi32(bits, kbits[q]);
      const __m128i tie = _mm_and_si128(_mm_cmpeq_epi32(bits, kbits[q]), _mm_cmplt_epi32(cols, kcol1[q]));
      t[q] = _mm_or_si128(lt, tie);
    }
    const __m128i bytes = _mm_packs_epi16(_mm_packs_epi32(t[0], t[1]), _mm_packs_epi32(t[2], t[3]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_and_si128(bytes, _mm_set1_epi8(1)));
  }
};
#else
struct Lanes16 {
  float lo[16], hi[16];
  int32_t below[16], upto[16];
  uint32_t kbits[16];
  int64_t kcol[16];

  void set_bounds(const float* lower, const float* upper, bool per_lane) {
    for (int t = 0; t < 16; ++t) {
      lo[t] = per_lane ? lower[t] : *lower;
      hi[t] = per_lane ? upper[t] : *upper;
      below[t] = upto[t] = 0;
    }
  }
  uint32_t count16(const float* x) {
    uint32_t in_band = 0;
    for (int t = 0; t < 16; ++t) {
      const float a = std::fabs(x[t]);
      const int32_t is_below = a < lo[t], is_upto = a <= hi[t];
      below[t] += is_below;
      upto[t] += is_upto;
      in_band |= uint32_t(is_upto & (is_below ^ 1)) << t;
    }
    return in_band;
  }
  void counts(int32_t* below_out, int32_t* upto_out) const {
    for (int t = 0; t < 16; ++t) {
      below_out[t] = below[t];
      upto_out[t] = upto[t];
    }
  }
  void set_kth(const uint32_t* bits, const int32_t* col, bool per_lane) {
    for (int t = 0; t < 16; ++t) {
      kbits[t] = per_lane ? bits[t] : *bits;
      kcol[t] = per_lane ? col[t] : *col;
    }
  }
  void select16(const float* x, int32_t col0, bool per_lane, uint8_t* out) const {
    for (int t = 0; t < 16; ++t) {
      const uint32_t bits = abs_bits(x[t]);
      const int64_t c = per_lane ? col0 : col0 + t;
      out[t] = (bits < kbits[t]) | ((bits == kbits[t]) & (c <= kcol[t]));
    }
  }
};
#endif

// Rows [r0, r0 + B). B == 1: one row (any strides; a contiguous row 16 entries at a time). B == 16:
// 16 adjacent rows (rs == 1), read column by column, so that the [n_out, fan_in] view of a
// [fan_in, n_out] weight is read and written in storage order.
template <int B>
int64_t select_block(const Params& p, int64_t r0, uint64_t* const* bands, std::vector<uint64_t>& keys) {
  static_assert(B == 1 || B == 16, "blocks are one row or sixteen");
  const int64_t limit = band_limit(p.margin);
  const float* base = p.w + r0 * p.rs;
  const bool row_lanes = B == 1 && p.cs == 1;  // B == 1: lanes along a contiguous row
  Lanes16 lanes;
  int32_t below[B], upto[B];
  int64_t count[B];
  uint64_t kth_key[B];
  for (int b = 0; b < B; ++b) below[b] = upto[b] = count[b] = 0;
  if (p.lower) {
    int64_t j = 0;
    if (B == 16 || row_lanes) {
      lanes.set_bounds(p.lower + r0, p.upper + r0, B == 16);
      const int64_t step = B == 16 ? 1 : 16;
      for (; j + step <= p.n; j += step) {
        const float* x = base + j * p.cs;
        uint32_t in_band = lanes.count16(x);
        while (in_band) {  // the few values inside the bracket (a few per cent)
          const int t = __builtin_ctz(in_band);
          in_band &= in_band - 1;
          const int b = B == 16 ? t : 0;
          const int64_t col = B == 16 ? j : j + t;
          bands[b][std::min(count[b], limit)] = make_key(abs_bits(x[t]), col);  // slot `limit` absorbs overflow
          ++count[b];
        }
      }
      int32_t lane_below[16], lane_upto[16];
      lanes.counts(lane_below, lane_upto);
      for (int t = 0; t < 16; ++t) {  // B == 16: one lane per row; B == 1: the row's lanes summed
        below[B == 16 ? t : 0] += lane_below[t];
        upto[B == 16 ? t : 0] += lane_upto[t];
      }
    }
    if (B == 1) {
      const float lo = p.lower[r0], hi = p.upper[r0];
      for (; j < p.n; ++j) {  // the rest of the row (or a strided row), one entry at a time
        const float a = std::fabs(base[j * p.cs]);
        const int32_t is_below = a < lo, is_upto = a <= hi;
        below[0] += is_below;
        upto[0] += is_upto;
        bands[0][std::min(count[0], limit)] = make_key(abs_bits(base[j * p.cs]), j);  // branchless
        count[0] += is_upto & (is_below ^ 1);
      }
    }
  }
  int64_t failed = 0;
  for (int b = 0; b < B; ++b) {
    const int64_t r = r0 + b;
    if (!(p.lower && select_in_band(p, r, below[b], upto[b], count[b], limit, bands[b], &kth_key[b]))) {
      kth_key[b] = select_full(p, r, keys);
      ++failed;
    }
  }
  uint32_t kbits[B];
  int32_t kcol[B];
  for (int b = 0; b < B; ++b) {
    kbits[b] = uint32_t(kth_key[b] >> 32);
    kcol[b] = int32_t(kth_key[b] & 0xFFFFFFFFu);
  }
  uint8_t* obase = p.out + r0 * p.ors;
  int64_t j = 0;
  if ((B == 16 && p.ors == 1) || (row_lanes && p.ocs == 1)) {
    lanes.set_kth(kbits, kcol, B == 16);
    const int64_t step = B == 16 ? 1 : 16;
    for (; j + step <= p.n; j += step) lanes.select16(base + j * p.cs, int32_t(j), B == 16, obase + j * p.ocs);
  }
  for (; j < p.n; ++j) {  // key(|w|, j) <= k-th key
    const float* col = base + j * p.cs;
    uint8_t* ocol = obase + j * p.ocs;
    for (int b = 0; b < B; ++b) {
      const uint32_t bits = abs_bits(col[b]);  // B == 16: rs == 1
      ocol[b * p.ors] = (bits < kbits[b]) | ((bits == kbits[b]) & (j <= kcol[b]));
    }
  }
  return failed;
}

// Error codes (negative returns of tdrop_lowest_k_abs).
constexpr int64_t kBadArguments = -1;
constexpr int64_t kOutOfMemory = -2;
constexpr int64_t kInternalError = -3;

template <int B>
int64_t run(const Params& p, int num_threads) {
  const int64_t limit = band_limit(p.margin);
  const int64_t blocks = p.rows / B;  // full blocks; the last rows % B rows one at a time
  int64_t failed = 0;
  std::atomic<int64_t> error{0};  // no exception may leave an OpenMP region: record it, skip the rest
#pragma omp parallel num_threads(num_threads) reduction(+ : failed)
  {
    std::vector<uint64_t> storage, keys;
    bool ready = true;
    try {
      storage.resize(p.lower ? B * (limit + 1) : 0);
      keys.resize(p.n);
    } catch (const std::bad_alloc&) {
      ready = false;
      error.store(kOutOfMemory);
    } catch (...) {
      ready = false;
      error.store(kInternalError);
    }
    uint64_t* bands[B];
    for (int b = 0; b < B; ++b) bands[b] = (p.lower && ready) ? storage.data() + b * (limit + 1) : nullptr;
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      if (!ready || error.load(std::memory_order_relaxed)) continue;
      try {
        failed += select_block<B>(p, blk * B, bands, keys);
      } catch (const std::bad_alloc&) {
        error.store(kOutOfMemory);
      } catch (...) {
        error.store(kInternalError);
      }
    }
#pragma omp for schedule(static)
    for (int64_t r = blocks * B; r < p.rows; ++r) {
      if (!ready || error.load(std::memory_order_relaxed)) continue;
      try {
        failed += select_block<1>(p, r, bands, keys);
      } catch (const std::bad_alloc&) {
        error.store(kOutOfMemory);
      } catch (...) {
        error.store(kInternalError);
      }
    }
  }
  const int64_t code = error.load();
  return code ? code : failed;
}

}  // namespace

extern "C" {

// Version of this ABI; the Python loader checks it.
int64_t tdrop_abi_version() { return 2; }

// out[r, c] = 1 for the k smallest |w[r, c]| of every row r (ties: lowest c), else 0, for
// 1 <= k < n. w: float32 [rows, n] with strides (rs, cs) in elements; out: uint8 [rows, n] with
// strides (ors, ocs). lower/upper: float32 [rows] bracket from the previous call, or null.
// new_lower/new_upper: float32 [rows], the bracket for the next call. Returns the number of rows
// the bracket did not hold for (all rows without a bracket).
int64_t tdrop_lowest_k_abs(const float* w, int64_t rows, int64_t n, int64_t rs, int64_t cs, int64_t k,
                           const float* lower, const float* upper, int64_t margin, uint8_t* out,
                           int64_t ors, int64_t ocs, float* new_lower, float* new_upper, int num_threads) {
  Params p{w, rows, n, rs, cs, k, lower, upper, margin, out, ors, ocs, new_lower, new_upper};
  if (!w || !out || !new_lower || !new_upper || rows <= 0 || n <= 0 || k < 1 || k >= n || margin < 0 ||
      margin > (int64_t(1) << 40) || (lower == nullptr) != (upper == nullptr))
    return kBadArguments;
  if (num_threads < 1) num_threads = 1;
  try {
    // rows adjacent in memory (a transposed view): blocks of 16 rows, read in storage order;
    // otherwise one row at a time
    return (rs == 1 && cs != 1) ? run<16>(p, num_threads) : run<1>(p, num_threads);
  } catch (const std::bad_alloc&) {
    return kOutOfMemory;
  } catch (...) {
    return kInternalError;
  }
}

}  // extern "C"
