/* Decode attention over the paged KV cache, on the CPU, reading K/V where they lie.

   One query token per sequence. For sequence b and KV head h (its G = heads / kv_heads query
   heads share it), over the keys the sequence sees (the last `window` of them when window > 0):

       p[g, j] = softmax_j(scale * q[b, h*G + g] . K[j])      out[b, h*G + g] = sum_j p[g, j] V[j]

   where K[j], V[j] sit in page block_tables[b, j / block_size] at offset j % block_size. The
   torch path instead copies every sequence's pages out of the pool (index_select) and runs
   SDPA over the padded copy with a mask: it reads the K/V three times and writes them once;
   this reads them once. Float32 throughout, two passes per sequence (scores, then the
   weighted sum of V), NaN propagating as in SDPA. Built by server/kernels/cpu_kernels.py with the C
   compiler and the OpenMP runtime PyTorch already uses; called through ctypes.

   Written for the compiler to vectorize (-O3 -march=native): dot products four keys at a
   time in GCC/Clang vector types (independent chains, one pairwise horizontal sum per key,
   all in registers), the exponentials through a branch-free polynomial (exp_lanes),
   accumulators behind restrict pointers. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define AHEAD 16 /* rows prefetched ahead: a page boundary costs no DRAM round trip */

/* GCC/Clang vector types: the compiler maps them onto the target's registers (one AVX-512
   register, two AVX2 ones, ...), and the accumulators below stay in registers. */
typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
static inline v16 load16(const float *p) {
  v16 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

/* The sum of a vector's lanes, halving it (pairwise, in registers). */
static inline float lane_sum(v16 a) {
  union {
    v16 whole;
    v8 half[2];
  } x = {.whole = a};
  union {
    v8 whole;
    v4 half[2];
  } y = {.whole = x.half[0] + x.half[1]};
  const v4 z = y.half[0] + y.half[1];
  return (z[0] + z[1]) + (z[2] + z[3]);
}

/* Ask for a row's cache lines ahead of use. */
static inline void prefetch_row(const float *row, int64_t floats) {
  for (int64_t i = 0; i < floats; i += 16) __builtin_prefetch(row + i, 0, 3);
}

/* q . k for four keys at once: 16 lanes at a time, then a scalar tail (head_dim not a
   multiple of 16). */
static inline void dot4(const float *restrict q, const float *restrict k0,
                        const float *restrict k1, const float *restrict k2,
                        const float *restrict k3, int64_t n, float *restrict out) {
  v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const v16 x = load16(q + i);
    a0 += x * load16(k0 + i);
    a1 += x * load16(k1 + i);
    a2 += x * load16(k2 + i);
    a3 += x * load16(k3 + i);
  }
  float s0 = lane_sum(a0), s1 = lane_sum(a1), s2 = lane_sum(a2), s3 = lane_sum(a3);
  for (; i < n; i++) {
    s0 += q[i] * k0[i];
    s1 += q[i] * k1[i];
    s2 += q[i] * k2[i];
    s3 += q[i] * k3[i];
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

/* e^x for x <= 0 (scores minus their maximum), in place, vectorizable: Cody-Waite range
   reduction to r in [-ln2/2, ln2/2] and a degree-6 Taylor polynomial (under 2 ulp there);
   below -87.3 the result is e^-87.3 (1e-38: no softmax weight), and NaN stays NaN. */
static inline void exp_lanes(float *restrict x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; i++) {
    float v = x[i];
    v = v < -87.3f ? -87.3f : v;
    const float k = rintf(v * 1.44269504088896341f);
    const float r = (v - k * 0.693359375f) + k * 2.12194440e-4f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union {
      int32_t i;
      float f;
    } scale = {.i = ((int32_t)k + 127) << 23};
    x[i] = p * scale.f;
  }
}

/* Returns 0, or -1 when a buffer could not be allocated (out is then incomplete).
   One sequence per work item, all of its heads together: each key (value) row of a token,
   every KV head side by side, is read once and in order, which the hardware prefetches. */
int paged_decode_attention(const float *q,       /* [B, H, D] contiguous */
                           const float *k_cache, /* the layer's K: page p, token t, head h at */
                           const float *v_cache, /*   p*page_stride + t*token_stride + h*D */
                           int64_t page_stride, int64_t token_stride,
                           const int64_t *block_tables, /* [B, max_blocks] contiguous */
                           int64_t max_blocks, const int64_t *ctx_lens, /* [B] keys seen */
                           int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                           int64_t head_dim, int64_t block_size, int64_t window, float scale,
                           float *out /* [B, H, D] contiguous */) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t v_delta = v_cache - k_cache; /* V sits at K's page and offset */
  int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
  for (int64_t b = 0; b < num_seqs; b++) {
    const int64_t ctx = ctx_lens[b];
    const int64_t first = (window > 0 && ctx > window) ? ctx - window : 0;
    const int64_t n = ctx - first;
    const int64_t *table = block_tables + b * max_blocks;
    const float *qb = q + b * num_heads * head_dim;
    float *ob = out + b * num_heads * head_dim;
    if (n <= 0) {
      for (int64_t i = 0; i < num_heads * head_dim; i++) ob[i] = 0.0f;
      continue;
    }
    /* scores [heads, n], the output accumulators [heads, head_dim], and each position's
       row (every KV head of one token) in K, then in V. */
    float *buf = malloc(sizeof(float) * (size_t)(num_heads * (n + head_dim)));
    const float **rows = malloc(sizeof(float *) * (size_t)(n + 3));
    if (buf == NULL || rows == NULL) {
      free(buf);
      free(rows);
      failed = 1;
      continue;
    }
    float *restrict scores = buf;
    float *restrict acc = buf + num_heads * n;
    /* Pages walked in order: no division per key. */
    for (int64_t j = first; j < ctx;) {
      const int64_t blk = j / block_size, end = (blk + 1) * block_size;
      const float *kb = k_cache + table[blk] * page_stride;
      for (; j < ctx && j < end; j++) rows[j - first] = kb + (j - blk * block_size) * token_stride;
    }
    for (int64_t j = n; j < n + 3; j++) rows[j] = rows[n - 1]; /* padding for dot4 */
    for (int64_t j = 0; j < n && j < AHEAD; j++) prefetch_row(rows[j], token_stride);
    for (int64_t j = 0; j < n; j += 4) {
      for (int64_t u = j + AHEAD; u < j + AHEAD + 4 && u < n; u++) prefetch_row(rows[u], token_stride);
      for (int64_t h = 0; h < num_heads; h++) {
        const int64_t off = (h / group) * head_dim;
        float four[4];
        const float *qh = qb + h * head_dim, *r0 = rows[j] + off, *r1 = rows[j + 1] + off;
        const float *r2 = rows[j + 2] + off, *r3 = rows[j + 3] + off;
        if (head_dim == 64) /* small Llamas' (SmolLM2's): unrolled, no tail: ~10% faster */
          dot4(qh, r0, r1, r2, r3, 64, four);
        else
          dot4(qh, r0, r1, r2, r3, head_dim, four);
        for (int64_t u = 0; u < 4 && j + u < n; u++) scores[h * n + j + u] = four[u] * scale;
      }
    }
    /* V's first rows are on their way during the softmax. */
    for (int64_t j = 0; j < n && j < AHEAD; j++) prefetch_row(rows[j] + v_delta, token_stride);
    /* Softmax per query head; a NaN score makes its row NaN, as in SDPA. */
    for (int64_t h = 0; h < num_heads; h++) {
      float *restrict s = scores + h * n;
      float m = s[0];
      for (int64_t j = 1; j < n; j++) m = s[j] > m ? s[j] : m;
      for (int64_t j = 0; j < n; j++) s[j] -= m;
      exp_lanes(s, n);
      float sum = 0.0f;
      for (int64_t j = 0; j < n; j++) sum += s[j];
      const float inv = 1.0f / sum;
      for (int64_t j = 0; j < n; j++) s[j] *= inv;
    }
    /* Weighted sum of V: each value row read once. */
    for (int64_t i = 0; i < num_heads * head_dim; i++) acc[i] = 0.0f;
    for (int64_t j = 0; j < n; j++) {
      if (j + AHEAD < n) prefetch_row(rows[j + AHEAD] + v_delta, token_stride);
      for (int64_t h = 0; h < num_heads; h++) {
        const float *restrict v = rows[j] + v_delta + (h / group) * head_dim;
        const float p = scores[h * n + j];
        float *restrict a = acc + h * head_dim;
#pragma omp simd
        for (int64_t d = 0; d < head_dim; d++) a[d] += p * v[d];
      }
    }
    for (int64_t i = 0; i < num_heads * head_dim; i++) ob[i] = acc[i];
    free(buf);
    free(rows);
  }
  return failed ? -1 : 0;
}
