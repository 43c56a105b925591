/* The interface report of abi.h: the compiler fills in sizes and offsets, so the report is always
 * that of the structs this library was built with. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "abi.h"
#include "decode_layer.h"

#define FIELD(type, field) {#field, offsetof(type, field), sizeof(((type *)0)->field)}

static const pdm_abi_field layer_weights[] = {
    FIELD(pdm_layer_weights, hidden),     FIELD(pdm_layer_weights, heads),
    FIELD(pdm_layer_weights, kv_heads),   FIELD(pdm_layer_weights, head_dim),
    FIELD(pdm_layer_weights, inter),      FIELD(pdm_layer_weights, input_norm),
    FIELD(pdm_layer_weights, post_norm),  FIELD(pdm_layer_weights, input_eps),
    FIELD(pdm_layer_weights, post_eps),   FIELD(pdm_layer_weights, q_norm),
    FIELD(pdm_layer_weights, k_norm),     FIELD(pdm_layer_weights, q_eps),
    FIELD(pdm_layer_weights, k_eps),      FIELD(pdm_layer_weights, qkv),
    FIELD(pdm_layer_weights, qkv_bias),   FIELD(pdm_layer_weights, o),
    FIELD(pdm_layer_weights, o_bias),     FIELD(pdm_layer_weights, gate_up),
    FIELD(pdm_layer_weights, gate_up_bias), FIELD(pdm_layer_weights, down),
    FIELD(pdm_layer_weights, down_bias),  FIELD(pdm_layer_weights, scale),
    {NULL, 0, 0},
};

static const pdm_abi_field decode_step[] = {
    FIELD(pdm_decode_step, batch),      FIELD(pdm_decode_step, positions),
    FIELD(pdm_decode_step, cos),        FIELD(pdm_decode_step, sin),
    FIELD(pdm_decode_step, max_positions), FIELD(pdm_decode_step, pool),
    FIELD(pdm_decode_step, pool_rows),  FIELD(pdm_decode_step, slot_rows),
    FIELD(pdm_decode_step, lens),       FIELD(pdm_decode_step, width),
    FIELD(pdm_decode_step, scratch),    FIELD(pdm_decode_step, threads),
    FIELD(pdm_decode_step, attention_threads),
    {NULL, 0, 0},
};

int64_t pdm_abi_version(void) { return PDM_ABI_VERSION; }

/* The field table of struct `name` (its size into *size), or NULL for a struct not reported here. */
const pdm_abi_field *pdm_abi_struct(const char *name, int64_t *size) {
    if (strcmp(name, "pdm_layer_weights") == 0) {
        *size = sizeof(pdm_layer_weights);
        return layer_weights;
    }
    if (strcmp(name, "pdm_decode_step") == 0) {
        *size = sizeof(pdm_decode_step);
        return decode_step;
    }
    return NULL;
}
