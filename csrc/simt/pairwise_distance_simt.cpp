// The very CUDA source, compiled by the host compiler against the SIMT emulator.
#include "cuda/pairwise_distance_cuda.cu"
