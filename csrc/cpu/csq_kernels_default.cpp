// CPU kernels compiled for the default ISA level (flags: setup.py ISA_FLAGS).
#include "cpu/csq_kernels_impl.h"
