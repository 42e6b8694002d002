/* loadgen: a closed-loop load generator for the memcached text protocol (bench/kvstore.py builds it).
 *
 *   loadgen HOST PORT CONNECTIONS SECONDS WARMUP KEYS GET_PERCENT VALUE_SIZE SEED [MULTI]
 *
 * Opens CONNECTIONS connections, sets every key once (keys are "key:" + 28 digits = 32 bytes), then keeps
 * one request in flight on each connection: a get (GET_PERCENT of the time) or a set of VALUE_SIZE bytes,
 * of a key drawn uniformly from KEYS (with MULTI > 1, a get asks for MULTI consecutive keys from a random
 * one on: a multi-key get, one request however many keys). After WARMUP seconds it counts, for SECONDS seconds, the requests
 * that complete and their latency (send to last byte of the reply, 1 us buckets), and the CPU time this
 * process used. Prints one JSON object. Written in C so that the generator is not the bottleneck: a
 * Python generator on one core tops out well below what memcached serves.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_US 2000000
#define BUF (1 << 20)

typedef struct {
    int fd;
    int is_get;
    size_t len;
    double sent;
    char in[BUF];
} conn_t;

static unsigned long long hist[MAX_US + 1];
static char value[4096];
static int value_size, keys, get_percent, multi = 1;
static unsigned int seed;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static int send_all(int fd, const char *data, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, data, n);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) continue;
            return -1;
        }
        data += w;
        n -= (size_t)w;
    }
    return 0;
}

static int send_request(conn_t *c) {
    static char req[65536];
    int key = rand_r(&seed) % keys;
    int n;
    c->is_get = (int)(rand_r(&seed) % 100) < get_percent;
    if (c->is_get) {
        n = snprintf(req, sizeof req, "get key:%028d", key);
        for (int i = 1; i < multi; i++) n += snprintf(req + n, sizeof req - n, " key:%028d", (key + i) % keys);
        memcpy(req + n, "\r\n", 2);
        n += 2;
    } else {
        n = snprintf(req, sizeof req, "set key:%028d 0 0 %d\r\n", key, value_size);
        memcpy(req + n, value, value_size);
        n += value_size;
        memcpy(req + n, "\r\n", 2);
        n += 2;
    }
    c->len = 0;
    c->sent = now();
    return send_all(c->fd, req, (size_t)n);
}

/* 1: the reply is complete, 0: more bytes needed, -1: an error reply */
static int complete(conn_t *c) {
    if (c->len < 2 || memcmp(c->in + c->len - 2, "\r\n", 2) != 0) return 0;
    if (!memcmp(c->in, "ERROR", 5) || !memcmp(c->in, "CLIENT_ERROR", 12) || !memcmp(c->in, "SERVER_ERROR", 12))
        return -1;
    if (!c->is_get) return 1;
    return c->len >= 5 && memcmp(c->in + c->len - 5, "END\r\n", 5) == 0;
}

static int dial(const char *host, int port) {
    struct sockaddr_in addr = {0};
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    inet_pton(AF_INET, host, &addr.sin_addr);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror("connect");
        exit(2);
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

static double percentile(unsigned long long total, double p) {
    unsigned long long want = (unsigned long long)(total * p), seen = 0;
    for (int us = 0; us <= MAX_US; us++) {
        seen += hist[us];
        if (seen > want) return us;
    }
    return MAX_US;
}

int main(int argc, char **argv) {
    if (argc != 10 && argc != 11) {
        fprintf(stderr, "usage: %s HOST PORT CONNECTIONS SECONDS WARMUP KEYS GET_PERCENT VALUE_SIZE SEED [MULTI]\n",
                argv[0]);
        return 2;
    }
    if (argc == 11) multi = atoi(argv[10]);
    if (multi < 1 || multi > 1000) {
        fprintf(stderr, "MULTI must be 1 to 1000\n");
        return 2;
    }
    const char *host = argv[1];
    int port = atoi(argv[2]), nconn = atoi(argv[3]);
    double seconds = atof(argv[4]), warmup = atof(argv[5]);
    keys = atoi(argv[6]);
    get_percent = atoi(argv[7]);
    value_size = atoi(argv[8]);
    seed = (unsigned int)atoi(argv[9]);
    if (value_size > (int)sizeof value - 1) value_size = sizeof value - 1;
    memset(value, 'v', value_size);

    conn_t *conns = calloc(nconn, sizeof(conn_t));
    for (int i = 0; i < nconn; i++) conns[i].fd = dial(host, port);

    /* preload every key over the first connection, 100 requests at a time */
    for (int first = 0; first < keys; first += 100) {
        char req[200 * 160];
        size_t n = 0;
        int batch = keys - first < 100 ? keys - first : 100;
        for (int k = first; k < first + batch; k++) {
            n += (size_t)snprintf(req + n, sizeof req - n, "set key:%028d 0 0 %d\r\n", k, value_size);
            memcpy(req + n, value, value_size);
            n += (size_t)value_size;
            memcpy(req + n, "\r\n", 2);
            n += 2;
        }
        if (send_all(conns[0].fd, req, n) < 0) return 3;
        int stored = 0;
        char in[4096];
        while (stored < batch) {
            ssize_t r = read(conns[0].fd, in, sizeof in);
            if (r <= 0) return 3;
            for (ssize_t j = 0; j < r; j++) stored += in[j] == '\n';
        }
    }

    int ep = epoll_create1(0);
    for (int i = 0; i < nconn; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &conns[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, conns[i].fd, &ev);
        if (send_request(&conns[i]) < 0) return 3;
    }

    double start = now(), measure_from = start + warmup, end = measure_from + seconds;
    double cpu_start = 0;
    int measuring = 0;
    unsigned long long ops = 0, errors = 0;
    struct epoll_event events[256];
    for (;;) {
        double t = now();
        if (!measuring && t >= measure_from) {
            measuring = 1;
            cpu_start = cpu();
        }
        if (t >= end) break;
        int n = epoll_wait(ep, events, 256, 100);
        for (int e = 0; e < n; e++) {
            conn_t *c = events[e].data.ptr;
            ssize_t r = read(c->fd, c->in + c->len, BUF - c->len);
            if (r <= 0) {
                fprintf(stderr, "connection closed by the server\n");
                return 4;
            }
            c->len += (size_t)r;
            int done = complete(c);
            if (done == 0) {
                if (c->len >= BUF) return 5;
                continue;
            }
            double finished = now();
            if (measuring && finished < end) {
                long us = (long)((finished - c->sent) * 1e6);
                hist[us > MAX_US ? MAX_US : us]++;
                ops++;
                if (done < 0) errors++;
            }
            if (send_request(c) < 0) return 3;
        }
    }
    double used = cpu() - cpu_start;
    printf("{\"ops\": %llu, \"seconds\": %.3f, \"ops_per_s\": %.0f, \"p50_us\": %.0f, \"p99_us\": %.0f, "
           "\"errors\": %llu, \"cpu_s\": %.3f, \"cpu_percent\": %.1f}\n",
           ops, seconds, ops / seconds, percentile(ops, 0.50), percentile(ops, 0.99), errors, used,
           100.0 * used / seconds);
    return 0;
}
