// Packed-weight kernels compiled for the avx512 ISA level (flags: setup.py ISA_FLAGS).
#include "cpu/packed_kernels_impl.h"
