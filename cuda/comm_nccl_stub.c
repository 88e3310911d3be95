/* comm_nccl_stub.c: stands in for the NCCL collectives in builds without CUDA. */
#include "comm_nccl.h"

Status comm_nccl_attach(Comm *c, int async) {
    (void)c; (void)async;
    return status_errorf("parallel.collectives=nccl: this dcmoe was built without CUDA and NCCL; rebuild with nvcc on "
                         "PATH and -Dcuda=enabled");
}
