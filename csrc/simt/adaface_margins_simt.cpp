// The very CUDA source, compiled by the host compiler against the SIMT emulator.
#include "cuda/adaface_margins_cuda.cu"
