/* backend_cuda_stub.c: stands in for the CUDA backend in builds without nvcc. */
#include "backend.h"

Status backend_cuda_init(Backend *be, int device) {
    (void)be;
    return status_errorf("run.backend=cuda: this dcmoe was built without CUDA (device %d requested); "
                         "rebuild with nvcc on PATH and -Dcuda=enabled", device);
}

Status backend_cuda_info(const Backend *be, char *name, size_t cap, double *mem_bytes) {
    (void)be;
    if (cap) name[0] = 0;
    *mem_bytes = 0;
    return status_errorf("backend_cuda_info: this dcmoe was built without CUDA");
}

Status backend_cuda_set_gemm_dtype(Backend *be, int dtype) {
    (void)be;
    return status_errorf("run.gemm_dtype: this dcmoe was built without CUDA (dtype %d requested)", dtype);
}
