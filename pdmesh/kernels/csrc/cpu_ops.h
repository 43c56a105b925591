/* The kernels of cpu_ops.c that other sources of the library call (see cpu_ops.c for each one's
 * contract; Python reaches them through pdmesh/kernels/cpu.py, whose SIGNATURES in build.py mirror
 * these prototypes: a change here needs a new PDM_ABI_VERSION, abi.h). */
#ifndef PDMESH_CPU_OPS_H
#define PDMESH_CPU_OPS_H

#include <stdint.h>

void pdm_rms_norm(const float *x, int64_t x_stride, const float *w, float eps, int64_t rows, int64_t n,
                  float *out, int threads);
void pdm_silu_mul(const float *gu, int64_t rows, int64_t inter, float *out, int threads);
int pdm_qk_norm_rope(const float *qkv, int64_t qkv_stride, int64_t tokens, int64_t heads, int64_t kv_heads,
                     int64_t d, const int64_t *positions, const float *cos_table, const float *sin_table,
                     int64_t max_positions, const float *qw, float q_eps, const float *kw, float k_eps,
                     float *q_out, float *k_out, int threads);
int pdm_store_kv(float *pool, int64_t pool_rows, int64_t width, const int64_t *rows, int64_t offset,
                 const float *k, int64_t k_stride, const float *v, int64_t v_stride, int64_t tokens);
int pdm_decode_attention(float *buf, int64_t kv_heads, int64_t batch, int64_t width, int64_t d,
                         const float *k_new, int64_t k_stride, const float *v_new, int64_t v_stride,
                         const int64_t *lens, const float *q, int64_t heads, float scale, float *out,
                         int threads);
void pdm_linear(const float *x, int64_t m, int64_t k, int64_t ldx, const float *packed, int64_t n,
                const float *bias, float *y, int threads);
void pdm_linear_add(const float *x, int64_t m, int64_t k, int64_t ldx, const float *packed, int64_t n,
                    const float *bias, float *y, int threads);

#endif
