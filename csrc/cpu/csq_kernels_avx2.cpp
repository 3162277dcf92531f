// CPU kernels compiled for the avx2 ISA level (flags: setup.py ISA_FLAGS).
#include "cpu/csq_kernels_impl.h"
