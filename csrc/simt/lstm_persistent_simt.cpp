// lstm_persistent.cu compiled as plain C++ against the SIMT emulator (see simt_ops.cpp): the same text
// that nvcc builds for the GPU.
#include "../cuda/lstm_persistent.cu"
