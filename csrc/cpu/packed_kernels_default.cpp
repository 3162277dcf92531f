// Packed-weight kernels compiled for the default ISA level (flags: setup.py ISA_FLAGS).
#include "cpu/packed_kernels_impl.h"
