/* Batched LoRA for short segments (decode tokens), on the CPU, weights read in the page pool.

   For each segment g (tokens [start_g, start_g + len_g) of one adapter) and slice s of a
   packed linear, with A_gs: [rank, in] and Bt_gs: [rank, width_s] row-major in the flat pool:

       out[t, offset_s : offset_s + width_s] += scaling_gs * ((x[t] @ A_gs.T) @ Bt_gs)

   the semantics of server/lora/ops.py (scaling after the expand, as PEFT applies it). The
   torch path runs one matmul and one addmm per slice for each segment: at a decode step with
   32 adapters that is thousands of tiny calls whose dispatch, not arithmetic, was a third of
   the step. Here one call per linear does every segment no longer than max_len, in parallel
   over (segment, slice) pairs, which write disjoint parts of `out`; longer segments (prefill)
   stay on the torch path's GEMMs. */

#include <stdint.h>
#include <stdlib.h>

static inline float dot(const float *a, const float *b, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; i++) acc += a[i] * b[i];
  return acc;
}

/* Returns 0, or -1 when a buffer could not be allocated (out is then incomplete). */
int lora_short_segments(const float *x, int64_t in_features, /* [T, in] contiguous */
                        float *out, int64_t out_features,    /* [T, N] contiguous */
                        const float *pool,                   /* the flat page pool */
                        const int64_t *seg_starts, const int64_t *seg_lens, int64_t num_segs,
                        const int64_t *a_offsets, const int64_t *b_offsets, /* [G, S] */
                        const int32_t *ranks, const float *scalings,       /* [G, S] */
                        int64_t num_slices, const int64_t *slice_offsets,
                        const int64_t *slice_widths, int64_t max_len) {
  const int64_t items = num_segs * num_slices;
  int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
  for (int64_t item = 0; item < items; item++) {
    const int64_t g = item / num_slices, s = item % num_slices;
    const int64_t len = seg_lens[g], rank = ranks[item];
    if (len <= 0 || len > max_len || rank <= 0) continue;
    const float *a = pool + a_offsets[item];
    const float *bt = pool + b_offsets[item];
    const float scaling = scalings[item];
    const int64_t width = slice_widths[s];
    float *buf = malloc(sizeof(float) * (size_t)(rank + width));
    if (buf == NULL) {
      failed = 1;
      continue;
    }
    float *h = buf, *delta = buf + rank;
    for (int64_t t = seg_starts[g]; t < seg_starts[g] + len; t++) {
      const float *xt = x + t * in_features;
      for (int64_t r = 0; r < rank; r++) h[r] = dot(xt, a + r * in_features, in_features);
      for (int64_t c = 0; c < width; c++) delta[c] = 0.0f;
      for (int64_t r = 0; r < rank; r++) {
        const float hr = h[r];
        const float *row = bt + r * width;
#pragma omp simd
        for (int64_t c = 0; c < width; c++) delta[c] += hr * row[c];
      }
      float *o = out + t * out_features + slice_offsets[s];
#pragma omp simd
      for (int64_t c = 0; c < width; c++) o[c] += scaling * delta[c];
    }
    free(buf);
  }
  return failed ? -1 : 0;
}
