/* backend_cuda: the CUDA/cuBLAS backend's plain-C entry (backend_cuda_init is declared in
 * src/backend.h). Built only when nvcc is found (-Dcuda=auto|enabled); without it the stub
 * in backend_cuda_stub.c returns an error status. */
#ifndef DCMOE_BACKEND_CUDA_H
#define DCMOE_BACKEND_CUDA_H
#include "backend.h"
#endif
