/*
 * PMDK libpmemobj baseline for `clustermem bench tx`: the same workload, each transaction
 * writes UPDATES u64 values at random 64-byte-aligned offsets of a 64 MiB root object, one
 * TX_ADD (pmemobj_tx_add_range_direct) per update. On an ordinary file (PMEM_IS_PMEM_FORCE
 * unset) PMDK persists with msync.
 *
 * usage: pmdk_tx POOL SECONDS UPDATES_PER_TX THREADS   -> prints one JSON line
 */
#include <libpmem.h>
#include <libpmemobj.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define REGION_BYTES (64UL << 20)
#define POOL_BYTES (160UL << 20)

static PMEMobjpool *pop;
static char *base;
static double seconds;
static int updates;

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t splitmix(uint64_t *s)
{
	uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
	return z ^ (z >> 31);
}

static void *worker(void *arg)
{
	uint64_t seed = (uint64_t)(uintptr_t)arg * 7919 + (uint64_t)time(NULL);
	uint64_t lines = REGION_BYTES / 64, done = 0;
	double end = now() + seconds;
	while (done % 64 != 0 || now() < end) {
		TX_BEGIN(pop) {
			for (int u = 0; u < updates; u++) {
				uint64_t *p = (uint64_t *)(base + splitmix(&seed) % lines * 64);
				pmemobj_tx_add_range_direct(p, sizeof(*p));
				*p = splitmix(&seed);
			}
		} TX_ONABORT {
			fprintf(stderr, "pmdk_tx: transaction aborted\n");
			exit(1);
		} TX_END
		done++;
	}
	return (void *)(uintptr_t)done;
}

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: %s POOL SECONDS UPDATES_PER_TX THREADS\n", argv[0]);
		return 2;
	}
	seconds = atof(argv[2]);
	updates = atoi(argv[3]);
	int threads = atoi(argv[4]);
	if (access(argv[1], F_OK) == 0)
		pop = pmemobj_open(argv[1], "clustermem-bench");
	else
		pop = pmemobj_create(argv[1], "clustermem-bench", POOL_BYTES, 0600);
	if (pop == NULL) {
		fprintf(stderr, "pmdk_tx: %s\n", pmemobj_errormsg());
		return 1;
	}
	PMEMoid root = pmemobj_root(pop, REGION_BYTES);
	base = pmemobj_direct(root);
	pthread_t tids[256];
	double start = now();
	for (int t = 0; t < threads && t < 256; t++)
		pthread_create(&tids[t], NULL, worker, (void *)(uintptr_t)t);
	uint64_t txs = 0;
	for (int t = 0; t < threads && t < 256; t++) {
		void *r;
		pthread_join(tids[t], &r);
		txs += (uint64_t)(uintptr_t)r;
	}
	double wall = now() - start;
	printf("{\"tx_per_s\":%.1f,\"txs\":%lu,\"threads\":%d,\"updates_per_tx\":%d,\"is_pmem\":%d,\"wall_s\":%.3f}\n",
	       txs / wall, (unsigned long)txs, threads, updates, pmem_is_pmem(base, 64) ? 1 : 0, wall);
	pmemobj_close(pop);
	return 0;
}
