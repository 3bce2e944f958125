// The very CUDA source, compiled by the host compiler against the SIMT emulator.
#include "cuda/margin_softmax_cuda.cu"
