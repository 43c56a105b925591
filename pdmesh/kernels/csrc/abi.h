/* What the library tells its Python loader (pdmesh/kernels/abi.py) about its interface, checked at
 * load before any kernel runs: a version, and the size and field offsets of each struct that Python
 * mirrors in ctypes. Bump PDM_ABI_VERSION (and ABI_VERSION in abi.py) with any change to a prototype
 * in cpu_ops.h or decode_layer.h, or to a struct's fields. */
#ifndef PDMESH_ABI_H
#define PDMESH_ABI_H

#include <stdint.h>

#define PDM_ABI_VERSION 1

/* One field of a mirrored struct; a table of them ends with a NULL name. */
typedef struct {
    const char *name;
    int64_t offset, size;
} pdm_abi_field;

int64_t pdm_abi_version(void);
const pdm_abi_field *pdm_abi_struct(const char *name, int64_t *size);

#endif
