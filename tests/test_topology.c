/* test_topology: the virtual topology (2x2 and 1x4 classification, local indices, same_node,
 * link parameters, the one-line description), its errors (naming topology.nodes,
 * topology.ranks_per_node and the rank count), and the real topology of a single process
 * (hostname and Slurm node ids, the SLURM_NTASKS check). Multi-rank real topologies are
 * exercised under mpirun by bench/bench_alltoall, not here.
 * Does not: start MPI (the single-process communicator stands in). */
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "topology.h"

static TopologyConfig vcfg(int nodes, int rpn) {
    TopologyConfig c;
    memset(&c, 0, sizeof c);
    c.nodes = nodes;
    c.ranks_per_node = rpn;
    c.intra_gbps = 150;
    c.inter_gbps = 25;
    c.latency_us = 5;
    return c;
}

static void test_virtual(void) {
    Topology t;
    TopologyConfig c = vcfg(2, 2);
    Status s = topology_virtual(&t, 4, &c);
    ok(STATUS_OK(s), "virtual 2x2: ok (%s)", s.msg);
    int want_node[4] = {0, 0, 1, 1}, want_local[4] = {0, 1, 0, 1};
    ok(t.n_ranks == 4 && t.n_nodes == 2 && t.is_virtual == 1 && strcmp(t.source, "virtual") == 0,
       "virtual 2x2: 4 ranks, 2 nodes, virtual (got %d, %d, %d, %s)", t.n_ranks, t.n_nodes, t.is_virtual, t.source);
    ok(memcmp(t.node_of, want_node, sizeof want_node) == 0, "virtual 2x2: node_of = 0 0 1 1 (got %d %d %d %d)",
       t.node_of[0], t.node_of[1], t.node_of[2], t.node_of[3]);
    ok(memcmp(t.local_index, want_local, sizeof want_local) == 0, "virtual 2x2: local_index = 0 1 0 1");
    ok(t.node_size[0] == 2 && t.node_size[1] == 2, "virtual 2x2: node sizes 2 2");
    ok(topology_same_node(&t, 0, 1) && topology_same_node(&t, 2, 3) && !topology_same_node(&t, 1, 2) &&
       !topology_same_node(&t, 0, 3) && topology_same_node(&t, 3, 3), "virtual 2x2: same_node");
    ok(t.intra_gbps == 150 && t.inter_gbps == 25 && t.latency_us == 5, "virtual 2x2: link parameters copied");
    char buf[128];
    topology_describe(&t, buf, sizeof buf);
    ok(strcmp(buf, "virtual 2 nodes x 2 ranks") == 0, "describe: \"%s\"", buf);
    topology_free(&t);
    topology_free(&t);          /* safe twice */
    ok(t.node_of == NULL && t.n_ranks == 0, "free: zeroes the struct (safe twice)");

    c = vcfg(1, 4);
    s = topology_virtual(&t, 4, &c);
    topology_describe(&t, buf, sizeof buf);
    ok(STATUS_OK(s) && t.n_nodes == 1 && strcmp(buf, "virtual 1 node x 4 ranks") == 0 && topology_same_node(&t, 0, 3),
       "virtual 1x4: one node (\"%s\")", buf);
    topology_free(&t);

    c = vcfg(3, 2);
    s = topology_virtual(&t, 6, &c);
    int n_ok = STATUS_OK(s);
    for (int r = 0; r < 6 && n_ok; r++) n_ok = t.node_of[r] == r / 2 && t.local_index[r] == r % 2;
    ok(n_ok && t.n_nodes == 3, "virtual 3x2: rank r on node r/2, local index r%%2");
    topology_free(&t);
}

static void test_virtual_errors(void) {
    Topology t;
    TopologyConfig c = vcfg(2, 3);
    Status s = topology_virtual(&t, 4, &c);
    ok(!STATUS_OK(s) && strstr(s.msg, "topology.nodes=2") && strstr(s.msg, "topology.ranks_per_node=3") &&
       strstr(s.msg, "6") && strstr(s.msg, "4 ranks"), "2x3 over 4 ranks: error names both keys and the rank count (%s)", s.msg);
    ok(t.node_of == NULL, "error leaves no allocation");
    topology_free(&t);

    c = vcfg(2, 0);
    s = topology_virtual(&t, 4, &c);
    ok(!STATUS_OK(s) && strstr(s.msg, "topology.ranks_per_node=0") && strstr(s.msg, "topology.nodes=2"),
       "ranks_per_node 0: error (%s)", s.msg);
    topology_free(&t);

    /* through topology_init: the virtual topology must match the communicator size */
    Comm comm;
    comm_single_init(&comm);
    c = vcfg(2, 2);
    s = topology_init(&t, &comm, &c);
    ok(!STATUS_OK(s) && strstr(s.msg, "topology.nodes=2") && strstr(s.msg, "the run has 1 ranks"),
       "init 2x2 on one process: error (%s)", s.msg);
    topology_free(&t);
    c = vcfg(1, 1);
    s = topology_init(&t, &comm, &c);
    ok(STATUS_OK(s) && t.is_virtual && t.n_nodes == 1 && t.n_ranks == 1, "init 1x1 on one process: virtual");
    topology_free(&t);
    c = vcfg(0, 2);
    s = topology_init(&t, &comm, &c);
    ok(!STATUS_OK(s) && strstr(s.msg, "topology.ranks_per_node=2") && strstr(s.msg, "topology.nodes"),
       "ranks_per_node without nodes: error (%s)", s.msg);
    topology_free(&t);
    comm_free(&comm);
}

static void test_real_single(void) {
    unsetenv("SLURM_NODEID");
    unsetenv("SLURM_NTASKS");
    Comm comm;
    comm_single_init(&comm);
    Topology t;
    TopologyConfig c = vcfg(0, 0);
    Status s = topology_init(&t, &comm, &c);
    char buf[128];
    topology_describe(&t, buf, sizeof buf);
    ok(STATUS_OK(s) && t.n_ranks == 1 && t.n_nodes == 1 && t.node_of[0] == 0 && t.local_index[0] == 0 &&
       t.node_size[0] == 1 && !t.is_virtual, "real, one process: one node (%s)", s.msg);
    ok(strcmp(buf, "single 1 node x 1 rank") == 0, "real, one process: \"%s\"", buf);
    ok(t.inter_gbps == 25, "real: link parameters copied");
    topology_free(&t);

    setenv("SLURM_NODEID", "7", 1);
    setenv("SLURM_NTASKS", "1", 1);
    s = topology_init(&t, &comm, &c);
    ok(STATUS_OK(s) && strcmp(t.source, "slurm") == 0 && t.n_nodes == 1, "SLURM_NODEID set: source slurm (%s)", t.source);
    topology_free(&t);

    setenv("SLURM_NTASKS", "3", 1);
    s = topology_init(&t, &comm, &c);
    ok(!STATUS_OK(s) && strstr(s.msg, "SLURM_NTASKS=3") && strstr(s.msg, "1 ranks"),
       "SLURM_NTASKS=3 on one rank: error names both numbers (%s)", s.msg);
    topology_free(&t);
    setenv("SLURM_NTASKS", "x", 1);
    s = topology_init(&t, &comm, &c);
    ok(!STATUS_OK(s) && strstr(s.msg, "SLURM_NTASKS"), "SLURM_NTASKS not a number: error (%s)", s.msg);
    topology_free(&t);
    unsetenv("SLURM_NODEID");
    unsetenv("SLURM_NTASKS");

    /* a NULL config means the real topology */
    s = topology_init(&t, &comm, NULL);
    ok(STATUS_OK(s) && t.n_nodes == 1, "NULL config: real topology");
    topology_free(&t);
    comm_free(&comm);
}

int main(void) {
    test_virtual();
    test_virtual_errors();
    test_real_single();
    return harness_done();
}
