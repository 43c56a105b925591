/* One decoder layer of a decode step in a single call: what pdmesh/models/decoder.py does through
 * the kernels of cpu_ops.c one Python call at a time (pre-norm attention with the fused q/k/v
 * projection, per-head q/k norms and rope, the KV store and the decode-workspace attention, the
 * output projection onto the residual; pre-norm SwiGLU onto the residual), in the same order with
 * the same kernels, so the result is the same to the bit. A decode step of the bench model made
 * ~75 such calls of 10-50 microseconds of Python each; now it makes one per layer.
 *
 * The caller (pdmesh/engine/fused_decode.py) checks every shape, pointer and stride once per model
 * and per step; the indices that come with the data (positions, slot rows, lengths) are checked by
 * the kernels that read them and reported here through the return value. */
#include <stdint.h>

#include "cpu_ops.h"
#include "decode_layer.h"

/* floats of scratch a step of `batch` needs for layers of these shapes */
int64_t pdm_decode_scratch_floats(int64_t batch, int64_t hidden, int64_t heads, int64_t kv_heads,
                                  int64_t head_dim, int64_t inter) {
    const int64_t qkv = (heads + 2 * kv_heads) * head_dim;
    return batch * (hidden + qkv + 2 * heads * head_dim + kv_heads * head_dim + 3 * inter);
}

/* h [B, hidden] (contiguous) becomes the layer's output in place; `buf` is this layer's workspace
 * [2, KVH, B, width, head_dim] and `pool_offset` its rows' offset from layer 0's. Returns 0; 1 when
 * a position lies outside the rope tables, 2 when a slot row lies outside the pool, 3 when a length
 * lies outside 1..width (or attention scratch ran out): h is then not to be used. */
int pdm_decode_layer(const pdm_layer_weights *w, const pdm_decode_step *s, int64_t pool_offset, float *buf,
                     float *h) {
    const int64_t b = s->batch, d = w->head_dim, hq = w->heads * d, hkv = w->kv_heads * d;
    const int64_t qkv_n = hq + 2 * hkv;
    float *normed = s->scratch;
    float *qkv = normed + b * w->hidden;
    float *q = qkv + b * qkv_n;
    float *k = q + b * hq;
    float *attn = k + b * hkv;
    float *gate_up = attn + b * hq;
    float *act = gate_up + b * 2 * w->inter;

    pdm_rms_norm(h, w->hidden, w->input_norm, w->input_eps, b, w->hidden, normed, s->threads);
    pdm_linear(normed, b, w->hidden, w->hidden, w->qkv, qkv_n, w->qkv_bias, qkv, s->threads);
    if (pdm_qk_norm_rope(qkv, qkv_n, b, w->heads, w->kv_heads, d, s->positions, s->cos, s->sin,
                         s->max_positions, w->q_norm, w->q_eps, w->k_norm, w->k_eps, q, k, s->threads))
        return 1;
    const float *v = qkv + hq + hkv;
    if (pdm_store_kv(s->pool, s->pool_rows, hkv, s->slot_rows, pool_offset, k, hkv, v, qkv_n, b)) return 2;
    if (pdm_decode_attention(buf, w->kv_heads, b, s->width, d, k, hkv, v, qkv_n, s->lens, q, w->heads,
                             w->scale, attn, s->attention_threads))
        return 3;
    pdm_linear_add(attn, b, hq, hq, w->o, w->hidden, w->o_bias, h, s->threads);

    pdm_rms_norm(h, w->hidden, w->post_norm, w->post_eps, b, w->hidden, normed, s->threads);
    pdm_linear(normed, b, w->hidden, w->hidden, w->gate_up, 2 * w->inter, w->gate_up_bias, gate_up, s->threads);
    pdm_silu_mul(gate_up, b, w->inter, act, s->threads);
    pdm_linear_add(act, b, w->inter, w->inter, w->down, w->hidden, w->down_bias, h, s->threads);
    return 0;
}
