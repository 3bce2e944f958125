// The very CUDA source, compiled by the host compiler against the SIMT emulator.
#include "cuda/center_loss_cuda.cu"
