/* backend_cuda_stub.c: stands in for the CUDA backend in builds without nvcc. */
#include "backend.h"

Status backend_cuda_init(Backend *be, int device) {
    (void)be;
    return status_errorf("run.backend=cuda: this dcmoe was built without CUDA (device %d requested); "
                         "rebuild with nvcc on PATH and -Dcuda=enabled", device);
}
