/* fuzz_main.c: the libFuzzer entry points for one target, chosen at compile time with
 * -DFUZZ_TARGET="name" (tests/fuzz/meson.build builds one executable per target). */
#include "targets.h"

#include <stdio.h>
#include <stdlib.h>

#ifndef FUZZ_TARGET
#error "build with -DFUZZ_TARGET=\"<target name>\""
#endif

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n);

static const FuzzTarget *target;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    target = fuzz_target_find(FUZZ_TARGET);
    if (!target) {
        fprintf(stderr, "fuzz: unknown target '%s'\n", FUZZ_TARGET);
        abort();
    }
    fuzz_setup();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
    target->run(data, n);
    return 0;
}
