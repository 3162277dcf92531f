// CPU kernels compiled for the avx2 ISA level (flags: setup.py ISA_FLAGS).
#include "cpu/lsq_kernels_impl.h"
