/* The structs pdm_decode_layer (decode_layer.c) reads. pdmesh/kernels/abi.py mirrors them in ctypes
 * and checks the mirror against pdm_abi_struct (abi.c) at load: a change here needs the same change
 * there and a new PDM_ABI_VERSION (abi.h). */
#ifndef PDMESH_DECODE_LAYER_H
#define PDMESH_DECODE_LAYER_H

#include <stdint.h>

/* A dense pre-norm decoder layer's weights (products packed for pdm_linear) and shapes. */
typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, inter;
    const float *input_norm, *post_norm; /* [hidden] */
    float input_eps, post_eps;
    const float *q_norm, *k_norm; /* [head_dim] per-head norms, NULL for none */
    float q_eps, k_eps;
    const float *qkv, *qkv_bias; /* (H + 2 KVH) head_dim outputs; the bias may be NULL */
    const float *o, *o_bias;
    const float *gate_up, *gate_up_bias; /* 2 inter outputs: gate, then up */
    const float *down, *down_bias;
    float scale;
} pdm_layer_weights;

/* What one decode step of `batch` sequences shares across its layers. */
typedef struct {
    int64_t batch;
    const int64_t *positions;     /* [B] */
    const float *cos, *sin;       /* [max_positions, head_dim] */
    int64_t max_positions;
    float *pool;                  /* the KV pool as rows of KVH head_dim floats */
    int64_t pool_rows;
    const int64_t *slot_rows;     /* [2B] layer 0's rows of the new K, then of the new V */
    const int64_t *lens;          /* [B] context lengths, the new token included */
    int64_t width;                /* the decode workspace's positions per sequence */
    float *scratch;               /* pdm_decode_scratch_floats() floats */
    int threads, attention_threads;
} pdm_decode_step;

int64_t pdm_decode_scratch_floats(int64_t batch, int64_t hidden, int64_t heads, int64_t kv_heads,
                                  int64_t head_dim, int64_t inter);
int pdm_decode_layer(const pdm_layer_weights *w, const pdm_decode_step *s, int64_t pool_offset, float *buf,
                     float *h);

#endif
