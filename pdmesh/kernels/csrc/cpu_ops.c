/* pdmesh CPU kernels (float32, AVX2 + FMA, OpenMP): a decoder layer's products over weights packed
 * once, the small ops around them (norms, rope, SwiGLU, the KV store), prefill attention read from
 * the paged pool, decode attention over the dense decode workspace, and the greedy argmax.
 *
 * Built at first use by pdmesh/kernels/build.py and called through ctypes (pdmesh/kernels/cpu.py),
 * which checks shapes, dtypes, strides and devices before any pointer reaches this file; indices
 * that come with the data (positions, block ids, slot rows, lengths) are checked here, where they
 * are read, and reported through the return value. Each function computes what the matching
 * PyTorch expression in pdmesh/models computes, up to float rounding (summation order, a
 * polynomial exp within 1.3 ulp).
 *
 * Parallel loops use the OpenMP runtime PyTorch itself loaded (libgomp.so.1 is matched by soname),
 * with the thread count the caller passes.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_ops.h"

#define MAX_HEAD_DIM 512 /* the per-head scratch of norm_rope_head (MAX_HEAD_DIM in cpu.py) */

/* exp(x) for 8 floats: range reduction by ln2, degree-6 polynomial, exponent by integer add
 * (within 1.3 ulp). Inputs below -87.3 give 0, above 88.376 (where 2^n would need n = 128) +inf,
 * NaN gives NaN. */
static inline __m256 exp256(__m256 x) {
    const __m256 hi = _mm256_set1_ps(88.3762626647949f);
    const __m256 lo = _mm256_set1_ps(-87.3365f);
    const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
    const __m256 ln2_hi = _mm256_set1_ps(0.693359375f);
    const __m256 ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
    const __m256 input = x;
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    __m256 over = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, ln2_hi, x);
    r = _mm256_fnmadd_ps(n, ln2_lo, r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    y = _mm256_andnot_ps(under, y);
    y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), over);
    return _mm256_blendv_ps(y, input, _mm256_cmp_ps(input, input, _CMP_UNORD_Q)); /* NaN stays NaN */
}

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax256(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static float sum_squares(const float *x, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    float s = hsum256(acc);
    for (; i < n; i++) s += x[i] * x[i];
    return s;
}

/* out = w * (x * rsqrt(mean(x^2) + eps)) for one row of n values (w may be NULL: no weight). */
static void rms_norm_row(const float *x, const float *w, float eps, int64_t n, float *out) {
    const float r = 1.0f / sqrtf(sum_squares(x, n) / (float)n + eps);
    const __m256 vr = _mm256_set1_ps(r);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), vr);
        if (w) v = _mm256_mul_ps(_mm256_loadu_ps(w + i), v);
        _mm256_storeu_ps(out + i, v);
    }
    for (; i < n; i++) out[i] = w ? w[i] * (x[i] * r) : x[i] * r;
}

/* rows x [rows, n] (row stride x_stride) -> out [rows, n] (contiguous). */
void pdm_rms_norm(const float *x, int64_t x_stride, const float *w, float eps, int64_t rows, int64_t n,
                  float *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * n >= 65536)
    for (int64_t t = 0; t < rows; t++) rms_norm_row(x + t * x_stride, w, eps, n, out + t * n);
}

/* out [rows, inter] = silu(gu[:, :inter]) * gu[:, inter:], gu [rows, 2 * inter] contiguous. */
void pdm_silu_mul(const float *gu, int64_t rows, int64_t inter, float *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * inter >= 32768)
    for (int64_t t = 0; t < rows; t++) {
        const float *g = gu + t * 2 * inter;
        const float *u = g + inter;
        float *o = out + t * inter;
        const __m256 one = _mm256_set1_ps(1.0f);
        const __m256 sign = _mm256_set1_ps(-0.0f);
        int64_t i = 0;
        for (; i + 8 <= inter; i += 8) {
            __m256 vg = _mm256_loadu_ps(g + i);
            __m256 den = _mm256_add_ps(one, exp256(_mm256_xor_ps(vg, sign)));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(vg, den), _mm256_loadu_ps(u + i)));
        }
        for (; i < inter; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

/* One head of d values: optional RMSNorm (weight w), then rotate-half rope with this position's
 * cos/sin rows: out[i] = x[i] cos[i] - x[i+h] sin[i], out[i+h] = x[i+h] cos[i+h] + x[i] sin[i+h]. */
static void norm_rope_head(const float *x, const float *w, float eps, const float *cs, const float *sn,
                           int64_t d, float *out) {
    float tmp[MAX_HEAD_DIM];
    const float *src = x;
    if (w) {
        rms_norm_row(x, w, eps, d, tmp);
        src = tmp;
    }
    const int64_t h = d / 2;
    for (int64_t i = 0; i < h; i++) {
        const float a = src[i], b = src[i + h];
        out[i] = a * cs[i] - b * sn[i];
        out[i + h] = b * cs[i + h] + a * sn[i + h];
    }
}

/* q and k heads of a fused qkv projection [tokens, (H + 2 KVH) * d] (row stride qkv_stride):
 * optional per-head RMSNorm (qw / kw, NULL for none), rope at each token's position from the
 * [max_positions, d] cos / sin tables; writes q_out [tokens, H, d] and k_out [tokens, KVH, d].
 * Returns 0, or 1 when a position lies outside the tables (that token's rows are not written) or d
 * is odd or above MAX_HEAD_DIM (nothing written). */
int pdm_qk_norm_rope(const float *qkv, int64_t qkv_stride, int64_t tokens, int64_t heads, int64_t kv_heads,
                     int64_t d, const int64_t *positions, const float *cos_table, const float *sin_table,
                     int64_t max_positions, const float *qw, float q_eps, const float *kw, float k_eps,
                     float *q_out, float *k_out, int threads) {
    if (d > MAX_HEAD_DIM || d % 2) return 1;
    int bad_position = 0;
#pragma omp parallel for num_threads(threads) schedule(static) if (tokens >= 64) reduction(| : bad_position)
    for (int64_t t = 0; t < tokens; t++) {
        if (positions[t] < 0 || positions[t] >= max_positions) {
            bad_position = 1;
            continue;
        }
        const float *row = qkv + t * qkv_stride;
        const float *cs = cos_table + positions[t] * d;
        const float *sn = sin_table + positions[t] * d;
        for (int64_t hh = 0; hh < heads; hh++)
            norm_rope_head(row + hh * d, qw, q_eps, cs, sn, d, q_out + (t * heads + hh) * d);
        for (int64_t hh = 0; hh < kv_heads; hh++)
            norm_rope_head(row + (heads + hh) * d, kw, k_eps, cs, sn, d, k_out + (t * kv_heads + hh) * d);
    }
    return bad_position;
}

/* a . b over d values, d a multiple of 8 (the attention kernels only run for such d) */
static inline float dot(const float *a, const float *b, int64_t d) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    return hsum256(acc);
}

/* Eight dot products q . k[i] at once (d a multiple of 8): eight accumulators, then one transposing
 * reduction instead of eight horizontal sums. */
static inline __m256 dot8(const float *qv, const float *const k[8], int64_t d) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t c = 0; c < d; c += 8) {
        const __m256 qc = _mm256_loadu_ps(qv + c);
        a0 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k[0] + c), a0);
        a1 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k[1] + c), a1);
        a2 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k[2] + c), a2);
        a3 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k[3] + c), a3);
        a4 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k[4] + c), a4);
        a5 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k[5] + c), a5);
        a6 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k[6] + c), a6);
        a7 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k[7] + c), a7);
    }
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* scores[j] = scale * q . keys[j] for j < n */
static void scaled_scores(const float *qv, const float *const *keys, int64_t n, int64_t d, float scale,
                          float *scores) {
    const __m256 vs = _mm256_set1_ps(scale);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(scores + j, _mm256_mul_ps(dot8(qv, keys + j, d), vs));
    for (; j < n; j++) scores[j] = dot(qv, keys[j], d) * scale;
}

/* out[0:d] = sum_j p[j] * v[j * ld + 0:d] (d a multiple of 8): 64 columns at a time in eight
 * independent accumulators (one accumulator chained through every j waits on each FMA). */
static void weighted_rows(const float *p, const float *v, int64_t ld, int64_t n, int64_t d, float *out) {
    int64_t c0 = 0;
    for (; c0 + 64 <= d; c0 += 64) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (int64_t j = 0; j < n; j++) {
            const __m256 pj = _mm256_broadcast_ss(p + j);
            const float *row = v + j * ld + c0;
            a0 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(row), a0);
            a1 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(row + 8), a1);
            a2 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(row + 16), a2);
            a3 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(row + 24), a3);
            a4 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(row + 32), a4);
            a5 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(row + 40), a5);
            a6 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(row + 48), a6);
            a7 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(row + 56), a7);
        }
        float *o = out + c0;
        _mm256_storeu_ps(o, a0);
        _mm256_storeu_ps(o + 8, a1);
        _mm256_storeu_ps(o + 16, a2);
        _mm256_storeu_ps(o + 24, a3);
        _mm256_storeu_ps(o + 32, a4);
        _mm256_storeu_ps(o + 40, a5);
        _mm256_storeu_ps(o + 48, a6);
        _mm256_storeu_ps(o + 56, a7);
    }
    for (; c0 < d; c0 += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t j = 0; j < n; j++)
            acc = _mm256_fmadd_ps(_mm256_broadcast_ss(p + j), _mm256_loadu_ps(v + j * ld + c0), acc);
        _mm256_storeu_ps(out + c0, acc);
    }
}

/* softmax in place over n scores; returns nothing, p sums to 1. */
static void softmax_row(float *s, int64_t n) {
    __m256 vm = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(s + i));
    float m = hmax256(vm);
    for (; i < n; i++) m = s[i] > m ? s[i] : m;
    const __m256 vmax = _mm256_set1_ps(m);
    __m256 vsum = _mm256_setzero_ps();
    for (i = 0; i + 8 <= n; i += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + i), vmax));
        _mm256_storeu_ps(s + i, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum256(vsum);
    for (; i < n; i++) {
        s[i] = expf(s[i] - m);
        sum += s[i];
    }
    const __m256 inv = _mm256_set1_ps(1.0f / sum);
    for (i = 0; i + 8 <= n; i += 8) _mm256_storeu_ps(s + i, _mm256_mul_ps(_mm256_loadu_ps(s + i), inv));
    for (; i < n; i++) s[i] *= 1.0f / sum;
}

/* Stores tokens' K and V rows ([tokens, width], row strides k_stride / v_stride) into the pool seen
 * as rows of width floats: token t's K goes to row rows[t] + offset, its V to rows[tokens + t] +
 * offset. Returns 0, or 1 when a row lies outside 0..pool_rows-1 (that row is not written). */
int pdm_store_kv(float *pool, int64_t pool_rows, int64_t width, const int64_t *rows, int64_t offset,
                 const float *k, int64_t k_stride, const float *v, int64_t v_stride, int64_t tokens) {
    int bad_row = 0;
    for (int64_t i = 0; i < 2 * tokens; i++) {
        int64_t row;
        if (__builtin_add_overflow(rows[i], offset, &row) || row < 0 || row >= pool_rows) {
            bad_row = 1;
            continue;
        }
        const float *src = i < tokens ? k + i * k_stride : v + (i - tokens) * v_stride;
        memcpy(pool + row * width, src, sizeof(float) * width);
    }
    return bad_row;
}

/* Decode attention over the workspace buf [2, KVH, B, width, d] (K then V, contiguous).
 *
 * First appends this step's k / v ([B, KVH, d] with row stride k_stride / v_stride between
 * sequences) at position lens[b] - 1 of each sequence, then for every (kv head, sequence) attends
 * its group of q heads (q [B, H, d] contiguous, head h reads kv head h / group) over the first
 * lens[b] positions: out [B, H, d]. d is a multiple of 8 (checked by the caller). Returns 0, or 1
 * when a length lies outside 1..width or scratch memory ran out (those rows are zeros). */
int pdm_decode_attention(float *buf, int64_t kv_heads, int64_t batch, int64_t width, int64_t d,
                         const float *k_new, int64_t k_stride, const float *v_new, int64_t v_stride,
                         const int64_t *lens, const float *q, int64_t heads, float scale, float *out,
                         int threads) {
    const int64_t group = heads / kv_heads;
    const int64_t plane = kv_heads * batch * width * d; /* K half -> V half */
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *scores = (float *)malloc(sizeof(float) * width);
        const float **rows = (const float **)malloc(sizeof(float *) * width);
#pragma omp for schedule(dynamic, 4)
        for (int64_t item = 0; item < kv_heads * batch; item++) {
            const int64_t kh = item / batch, b = item % batch, n = lens[b];
            if (!scores || !rows || n < 1 || n > width) { /* never touch memory outside buf */
                memset(out + (b * heads + kh * group) * d, 0, sizeof(float) * group * d);
                failed = 1;
                continue;
            }
            float *keys = buf + (kh * batch + b) * width * d;
            float *values = keys + plane;
            memcpy(keys + (n - 1) * d, k_new + b * k_stride + kh * d, sizeof(float) * d);
            memcpy(values + (n - 1) * d, v_new + b * v_stride + kh * d, sizeof(float) * d);
            const float *qs = q + (b * heads + kh * group) * d;
            for (int64_t s = 0; s < n; s++) rows[s] = keys + s * d;
            for (int64_t g = 0; g < group; g++) { /* the group's second pass finds K and V in L2 */
                scaled_scores(qs + g * d, rows, n, d, scale, scores);
                softmax_row(scores, n);
                weighted_rows(scores, values, d, n, d, out + (b * heads + kh * group + g) * d);
            }
        }
        free(rows);
        free(scores);
    }
    return failed;
}

/* Prefill attention straight from the paged pool, any mix of lengths and cached prefixes.
 *
 * Sequence b has query_lens[b] new tokens (rows query_start[b].. of q [T, H, d] and out) at the end
 * of its context_lens[b] tokens, all already in the pool. Token j of sequence b lies at
 * kv + tables[b * table_width + j / block_size] * block_stride + (j % block_size) * token_stride,
 * its K there and its V value_offset floats further, head kh at kh * d (value_offset counts from
 * the K row). Each new token attends
 * causally (positions up to its own). Returns 0, or 1 when a block id is outside 0..num_blocks-1, a
 * context is shorter than its queries or longer than the table, rows fall outside q's tokens, or
 * scratch memory ran out (that sequence's rows are zeros where they exist). */
int pdm_prefill_attention(const float *q, int64_t tokens, int64_t heads, int64_t kv_heads, int64_t d,
                          const float *kv, int64_t block_stride, int64_t value_offset, int64_t token_stride,
                          int64_t block_size, const int64_t *tables, int64_t table_width, int64_t num_blocks,
                          const int64_t *query_start, const int64_t *query_lens, const int64_t *context_lens,
                          int64_t batch, float scale, float *out, int threads) {
    const int64_t group = heads / kv_heads;
    const int64_t capacity = table_width * block_size; /* the most tokens a table can address */
    int bad_block = 0;
    int64_t longest = 1; /* scratch size: the longest context that passes the checks below */
    for (int64_t b = 0; b < batch; b++)
        if (context_lens[b] <= capacity && context_lens[b] > longest) longest = context_lens[b];
#pragma omp parallel num_threads(threads) reduction(| : bad_block)
    {
        float *scores = (float *)malloc(sizeof(float) * longest);
        const float **keys = (const float **)malloc(sizeof(float *) * longest);
        /* the context's K and V copied densely: pool rows of one head lie a token's whole width
         * apart (and blocks far apart), which maps them onto few L1 sets */
        float *dense = (float *)malloc(sizeof(float) * 2 * longest * d);
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < batch * kv_heads; item++) {
            const int64_t b = item / kv_heads, kh = item % kv_heads;
            const int64_t n = query_lens[b], ctx = context_lens[b], first = query_start[b];
            if (n < 0 || first < 0 || first > tokens - n) { /* rows outside q / out: touch nothing */
                bad_block = 1;
                continue;
            }
            int ok = scores && keys && dense && ctx >= n && ctx <= capacity;
            for (int64_t j = 0; ok && j < ctx; j++) {
                const int64_t block = tables[b * table_width + j / block_size];
                ok = block >= 0 && block < num_blocks;
                if (!ok) break;
                const float *src = kv + block * block_stride + (j % block_size) * token_stride + kh * d;
                memcpy(dense + j * d, src, sizeof(float) * d);
                memcpy(dense + (ctx + j) * d, src + value_offset, sizeof(float) * d);
                keys[j] = dense + j * d;
            }
            if (!ok) {
                bad_block = 1;
                for (int64_t i = 0; i < n; i++)
                    memset(out + ((first + i) * heads + kh * group) * d, 0, sizeof(float) * group * d);
                continue;
            }
            const float *values = dense + ctx * d;
            for (int64_t i = 0; i < n; i++) {
                const int64_t visible = ctx - n + i + 1;
                for (int64_t g = 0; g < group; g++) {
                    const int64_t row = (first + i) * heads + kh * group + g;
                    const float *qv = q + row * d;
                    scaled_scores(qv, keys, visible, d, scale, scores);
                    softmax_row(scores, visible);
                    weighted_rows(scores, values, d, visible, d, out + row * d);
                }
            }
        }
        free(dense);
        free(keys);
        free(scores);
    }
    return bad_block;
}

/* ---- y = x W^T + bias over a weight packed once into panels of LINEAR_NR output columns ----
 *
 * Packed layout (pack_linear_weight in cpu.py): [panels, K, LINEAR_NR], output columns zero-padded
 * to whole panels, and the bias (when there is one) padded alike. A 4 x 24 register block keeps
 * twelve accumulators in registers while each step of K loads three vectors of weights and
 * broadcasts four inputs; threads split the panels, so each weight is read from memory once per
 * call whatever the row count. */
#define LINEAR_NR 24
#define LINEAR_MR 4
#define LINEAR_PREFETCH 16 /* K steps ahead */
#ifndef LINEAR_MC
#define LINEAR_MC 64 /* rows per block */
#endif

#define FMA_ROW(xr, a0, a1, a2)                                                                    \
    do {                                                                                           \
        const __m256 v = _mm256_broadcast_ss((xr) + k);                                            \
        a0 = _mm256_fmadd_ps(v, w0, a0);                                                           \
        a1 = _mm256_fmadd_ps(v, w1, a1);                                                           \
        a2 = _mm256_fmadd_ps(v, w2, a2);                                                           \
    } while (0)

/* rows 1..4 of x (row pointers; rows past `rows` repeat a valid one and are not stored) times one
 * panel: writes `rows` x `ncols` outputs at y (row stride ldy), or adds them to y's values when
 * `add` (a residual: y + (bias + x.w), the sum PyTorch's `h + linear(x)` forms). */
static void linear_block(const float *const xr[LINEAR_MR], const float *panel, int64_t k_len, const float *bias,
                         float *y, int64_t ldy, int rows, int ncols, int add) {
    __m256 b0 = _mm256_setzero_ps(), b1 = b0, b2 = b0;
    if (bias) {
        b0 = _mm256_loadu_ps(bias);
        b1 = _mm256_loadu_ps(bias + 8);
        b2 = _mm256_loadu_ps(bias + 16);
    }
    __m256 a00 = b0, a01 = b1, a02 = b2, a10 = b0, a11 = b1, a12 = b2;
    __m256 a20 = b0, a21 = b1, a22 = b2, a30 = b0, a31 = b1, a32 = b2;
    const float *x0 = xr[0], *x1 = xr[1], *x2 = xr[2], *x3 = xr[3];
    for (int64_t k = 0; k < k_len; k++) {
        const float *w = panel + k * LINEAR_NR;
        _mm_prefetch((const char *)(w + LINEAR_PREFETCH * LINEAR_NR), _MM_HINT_T0);
        const __m256 w0 = _mm256_load_ps(w), w1 = _mm256_load_ps(w + 8), w2 = _mm256_load_ps(w + 16);
        FMA_ROW(x0, a00, a01, a02);
        FMA_ROW(x1, a10, a11, a12);
        FMA_ROW(x2, a20, a21, a22);
        FMA_ROW(x3, a30, a31, a32);
    }
    float tmp[LINEAR_MR][LINEAR_NR];
    const __m256 acc[LINEAR_MR][3] = {{a00, a01, a02}, {a10, a11, a12}, {a20, a21, a22}, {a30, a31, a32}};
    for (int r = 0; r < rows; r++) {
        float *yr = y + r * ldy;
        if (ncols == LINEAR_NR) {
            for (int j = 0; j < 3; j++) {
                __m256 v = acc[r][j];
                if (add) v = _mm256_add_ps(_mm256_loadu_ps(yr + 8 * j), v);
                _mm256_storeu_ps(yr + 8 * j, v);
            }
        } else {
            for (int j = 0; j < 3; j++) _mm256_storeu_ps(tmp[r] + 8 * j, acc[r][j]);
            for (int c = 0; c < ncols; c++) yr[c] = add ? yr[c] + tmp[r][c] : tmp[r][c];
        }
    }
}

/* x [m, k] (row stride ldx) -> y [m, n] (contiguous; y += when `add`); packed as above, 32-byte
 * aligned. Rows go LINEAR_MC at a time, so that a block of inputs stays in L2 while every panel
 * streams past it (one block covers a decode batch: its weights are read once). */
static void linear_rows(const float *x, int64_t m, int64_t k, int64_t ldx, const float *packed, int64_t n,
                        const float *bias, float *y, int threads, int add) {
    const int64_t panels = (n + LINEAR_NR - 1) / LINEAR_NR;
    for (int64_t m_block = 0; m_block < m; m_block += LINEAR_MC) {
        const int64_t m_end = m - m_block < LINEAR_MC ? m : m_block + LINEAR_MC;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t p = 0; p < panels; p++) {
            const float *panel = packed + p * k * LINEAR_NR;
            const int ncols = (int)(n - p * LINEAR_NR < LINEAR_NR ? n - p * LINEAR_NR : LINEAR_NR);
            const float *bp = bias ? bias + p * LINEAR_NR : NULL;
            for (int64_t m0 = m_block; m0 < m_end; m0 += LINEAR_MR) {
                const int rows = (int)(m_end - m0 < LINEAR_MR ? m_end - m0 : LINEAR_MR);
                const float *xr[LINEAR_MR];
                for (int r = 0; r < LINEAR_MR; r++) xr[r] = x + (m0 + (r < rows ? r : 0)) * ldx;
                linear_block(xr, panel, k, bp, y + m0 * n + p * LINEAR_NR, n, rows, ncols, add);
            }
        }
    }
}

void pdm_linear(const float *x, int64_t m, int64_t k, int64_t ldx, const float *packed, int64_t n,
                const float *bias, float *y, int threads) {
    linear_rows(x, m, k, ldx, packed, n, bias, y, threads, 0);
}

/* y [m, n] += x W^T + bias: a projection added onto the residual stream it feeds. */
void pdm_linear_add(const float *x, int64_t m, int64_t k, int64_t ldx, const float *packed, int64_t n,
                    const float *bias, float *y, int threads) {
    linear_rows(x, m, k, ldx, packed, n, bias, y, threads, 1);
}

/* Greedy picks: the index of each row's largest value (the first on ties, NaN above all, as
 * torch.argmax) for x [rows, n] (row stride ldx) into out [rows]. */
void pdm_argmax(const float *x, int64_t rows, int64_t n, int64_t ldx, int64_t *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * n >= 262144)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * ldx;
        /* a vector pass for the maximum, then the first index holding it */
        __m256 vm = _mm256_set1_ps(-INFINITY);
        int64_t i = 0, nan_at = -1;
        for (; i + 8 <= n; i += 8) {
            const __m256 v = _mm256_loadu_ps(row + i);
            if (nan_at < 0 && _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q))) {
                for (int64_t j = i; j < i + 8; j++)
                    if (isnan(row[j])) { nan_at = j; break; }
            }
            vm = _mm256_max_ps(vm, v);
        }
        float m = hmax256(vm);
        for (; i < n; i++) {
            if (nan_at < 0 && isnan(row[i])) nan_at = i;
            m = row[i] > m ? row[i] : m;
        }
        int64_t best = 0;
        if (nan_at >= 0) best = nan_at;
        else
            for (int64_t j = 0; j < n; j++)
                if (row[j] == m) { best = j; break; }
        out[r] = best;
    }
}
