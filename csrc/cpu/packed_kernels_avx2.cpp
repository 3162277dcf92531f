// Packed-weight kernels compiled for the avx2 ISA level (flags: setup.py ISA_FLAGS).
#include "cpu/packed_kernels_impl.h"
