/* Plain C reference sender for the benchmarks: read() 1 MiB, memchr, three zmq_send per line.
 *
 * It cuts exactly like Docker's copier (and zeroline): a line longer than LIMIT bytes goes out as
 * LIMIT-byte chunks, then the (possibly empty) rest; payload = PREFIX + piece, seed framing. So
 * the receiver's count and checksum match the other rows'.
 *
 * pyzmq wheels ship a private libzmq and no zmq.h: the few prototypes and constants used are
 * declared here (stable libzmq ABI since 3.x) and bench_e2e links against pyzmq's .so file with an
 * rpath.
 *
 * usage: ref_sender ENDPOINT FILE NBYTES PREFIX TENANT SERVICE LIMIT SNDHWM
 * prints one JSON object: {"t0":..,"t1":..,"lines":..,"messages":..,"cpu_s":..,"vmhwm_kb":..}
 * with t0/t1 from CLOCK_MONOTONIC (same clock as Python's time.monotonic()).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

void *zmq_ctx_new(void);
int zmq_ctx_term(void *context);
void *zmq_socket(void *context, int type);
int zmq_close(void *socket);
int zmq_connect(void *socket, const char *endpoint);
int zmq_setsockopt(void *socket, int option, const void *value, size_t len);
int zmq_send(void *socket, const void *buf, size_t len, int flags);
int zmq_errno(void);
const char *zmq_strerror(int errnum);

#define ZMQ_PUSH 8
#define ZMQ_SNDMORE 2
#define ZMQ_LINGER 17
#define ZMQ_SNDHWM 23

#define READ_BYTES (1 << 20)

static void *sock;
static const char *tenant, *service;
static size_t tenant_len, service_len, prefix_len;
static char *payload;             /* prefix, then the piece being sent */
static unsigned long long messages;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *what) {
    fprintf(stderr, "ref_sender: %s: %s\n", what, zmq_strerror(zmq_errno()));
    exit(1);
}

static int send_all(const void *buf, size_t len, int flags) {
    while (zmq_send(sock, buf, len, flags) < 0) {
        if (zmq_errno() != EINTR)
            return -1;
    }
    return 0;
}

static void send_piece(const char *line, size_t n) {
    memcpy(payload + prefix_len, line, n);
    if (send_all(tenant, tenant_len, ZMQ_SNDMORE) || send_all(service, service_len, ZMQ_SNDMORE)
        || send_all(payload, prefix_len + n, 0))
        die("zmq_send");
    messages++;
}

static long vmhwm_kb(void) {
    /* ru_maxrss of an exec'd child also counts its parent's peak; VmHWM is this image's own. */
    char line[256];
    long kb = -1;
    FILE *f = fopen("/proc/self/status", "r");
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %ld kB", &kb) == 1)
            break;
    fclose(f);
    return kb;
}

int main(int argc, char **argv) {
    if (argc != 9) {
        fprintf(stderr, "usage: %s ENDPOINT FILE NBYTES PREFIX TENANT SERVICE LIMIT SNDHWM\n",
                argv[0]);
        return 2;
    }
    const char *endpoint = argv[1], *path = argv[2];
    long long left = atoll(argv[3]);
    const char *prefix = argv[4];
    tenant = argv[5];
    service = argv[6];
    size_t limit = (size_t)atol(argv[7]);
    int hwm = atoi(argv[8]), linger = 30000;
    tenant_len = strlen(tenant);
    service_len = strlen(service);
    prefix_len = strlen(prefix);

    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        perror(path);
        return 1;
    }
    /* Unconsumed text (< limit bytes, no newline) is moved to the front before the next read. */
    size_t cap = READ_BYTES + limit;
    char *buf = malloc(cap);
    payload = malloc(prefix_len + limit);
    if (!buf || !payload)
        return 1;
    memcpy(payload, prefix, prefix_len);

    void *ctx = zmq_ctx_new();
    sock = zmq_socket(ctx, ZMQ_PUSH);
    if (!sock)
        die("zmq_socket");
    if (zmq_setsockopt(sock, ZMQ_SNDHWM, &hwm, sizeof hwm)
        || zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger))
        die("zmq_setsockopt");
    if (zmq_connect(sock, endpoint))
        die("zmq_connect");

    struct rusage ru0, ru1;
    unsigned long long lines = 0;
    size_t have = 0;
    getrusage(RUSAGE_SELF, &ru0);
    double t0 = now_s();
    for (;;) {
        ssize_t got = 0;
        if (left > 0) {
            size_t want = cap - have < (size_t)left ? cap - have : (size_t)left;
            got = read(fd, buf + have, want);
            if (got < 0) {
                if (errno == EINTR)
                    continue;
                perror("read");
                return 1;
            }
            left -= got;
        }
        if (got == 0) {
            if (have)               /* unterminated tail at EOF */
                send_piece(buf, have), lines++;
            break;
        }
        have += got;
        size_t pos = 0;
        for (;;) {
            size_t avail = have - pos, window = avail < limit ? avail : limit;
            const char *nl = memchr(buf + pos, '\n', window);
            if (nl) {
                send_piece(buf + pos, nl - (buf + pos));
                lines++;
                pos = nl - buf + 1;
            } else if (window == limit) {
                send_piece(buf + pos, limit);   /* a partial chunk; the line goes on */
                pos += limit;
            } else {
                break;
            }
        }
        memmove(buf, buf + pos, have - pos);
        have -= pos;
    }
    double t1 = now_s();
    getrusage(RUSAGE_SELF, &ru1);
    double cpu = (ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec)
                 + (ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) * 1e-6
                 + (ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec)
                 + (ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) * 1e-6;
    printf("{\"t0\": %.9f, \"t1\": %.9f, \"lines\": %llu, \"messages\": %llu, \"cpu_s\": %.6f, "
           "\"vmhwm_kb\": %ld}\n", t0, t1, lines, messages, cpu, vmhwm_kb());
    fflush(stdout);
    zmq_close(sock);
    zmq_ctx_term(ctx);
    return 0;
}
