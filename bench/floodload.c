/*
 * floodload: a native open-loop connection flood for bench/flood.py (built by bench/cload.py's
 * build(), driven by bench/flood.py --client c).
 *
 * Usage: floodload --port PORT --rate R --seconds S [--host 127.0.0.1] [--source 127.0.0.1]
 *                  [--max-count N] [--max-in-flight C] [--timeout T] [--start-at EPOCH]
 *                  [--close rst|wait] [--request-file PATH|-] [--samples]
 *
 * The request (at most 64 KiB, sent as is on every connection, e.g. a GET with a bad
 * `Authorization: Bearer` token) is read from --request-file, or from stdin when that is `-`
 * (the default) until end of input.
 *
 * One thread, Linux epoll (level-triggered), non-blocking sockets. A periodic timerfd (period
 * 1/R, at least 100 us) wakes the loop; on every wakeup the schedule is caught up from the
 * clock, open-loop: request k (k = 0..N-1, N = min(--max-count, R*S)) is due at t0 + k/R
 * whatever became of the earlier ones. A due request is sent if fewer than --max-in-flight are
 * outstanding, otherwise it is counted as skipped. Sending a request: socket, bind to --source
 * with port 0 and IP_BIND_ADDRESS_NO_PORT (the port is picked at connect(), per destination,
 * so the whole ephemeral range is usable for the one gateway address), non-blocking connect(),
 * on writability write the request, then read until the status line (the first CRLF, or 256
 * bytes) is complete; its code is recorded, and the time from the connect() call to it (the
 * latency). Then, with --close rst (the default), the socket is closed with SO_LINGER 0: an RST,
 * so no TIME_WAIT is left on either side and ~40,000 connections in 10 s from one address do not
 * exhaust the ephemeral ports (32768-60999 by default); with --close wait it reads on until the
 * gateway closes and then closes normally (the gateway, having closed first, keeps the
 * TIME_WAIT). A connection not answered within --timeout of its connect() is counted as a
 * timeout ("connect" if the TCP handshake had not completed, else "status") and reset.
 * connect() failures (EADDRNOTAVAIL when the ports run out, ECONNREFUSED, ...) are counted by
 * errno name; so are resets or closes before a status line.
 *
 * The schedule runs for --seconds after --start-at (a CLOCK_REALTIME epoch, default now; at
 * most 60 s ahead) or until N requests were due; the connections still outstanding then get
 * --timeout more, and whatever is left is counted as timed out. Then one JSON line on stdout:
 *
 *   {"type":"result","due":..,"sent":..,"skipped":..,"answered":..,"statuses":{"401":n,..},
 *    "connect_errors":{"EADDRNOTAVAIL":n,..},"errors":{"reset before status":n,..},
 *    "timeouts":{"connect":n,"status":n},"latency_ms":{"p50":..,"p99":..,"max":..},
 *    "lag_ms":{"p50":..,"p99":..,"max":..},"send_window_s":..,"first_sent":..,"last_sent":..,
 *    "max_outstanding":..,"cpu_user":..,"cpu_sys":..}
 *
 * "sent" counts the connections started (connect() called), including those that failed; "lag" is
 * how late each batch of due requests was started after its first request's due time;
 * "send_window_s" is from the first to the last request sent, "first_sent" and "last_sent" are
 * those moments on CLOCK_MONOTONIC (Python's time.monotonic() on Linux). With --samples the line
 * also carries every latency ("latency_samples_ms") and lag ("lag_samples_ms"), so that the
 * figures of several processes can be merged. Only loopback (127.0.0.0/8) addresses are accepted
 * for --host and --source. Bounds: N <= 5,000,000; --max-in-flight below RLIMIT_NOFILE (the soft
 * limit is raised to the hard one first); the process exits by itself (SIGALRM) --seconds + 2 *
 * --timeout + 30 s after the start whatever it is doing.
 *
 * Build: gcc -O2 -Wall -Wextra -Werror -std=c11 -o floodload floodload.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define MAX_COUNT 5000000L
#define MAX_REQUEST_BYTES (64 * 1024)
#define STATUS_LINE_BYTES 256 /* read at most this much for the status line */
#define MAX_EVENTS 1024
#define TIMER_TAG UINT32_MAX
#define MIN_PERIOD_NS 100000L /* the timerfd's shortest period: 100 us */
#define N_ERRNO 134           /* errno values counted by name below this */

enum state { S_FREE, S_CONNECTING, S_SENDING, S_STATUS, S_DRAIN };

struct conn {
    int fd;
    enum state state;
    uint32_t sent_bytes; /* of the request */
    uint32_t have;       /* bytes of the status line read */
    uint32_t gen;        /* bumped on every use of the slot */
    double started;      /* CLOCK_MONOTONIC at connect() */
    uint32_t next_free;  /* free list link */
    char line[STATUS_LINE_BYTES];
};

static struct {
    int port;
    double rate;
    double seconds;
    long max_count;
    long max_in_flight;
    double timeout;
    double start_at; /* CLOCK_REALTIME; 0 = now */
    bool close_rst;
    bool samples;
    const char *request_file;
} opt = {
    .max_count = MAX_COUNT,
    .max_in_flight = 4000,
    .timeout = 5.0,
    .close_rst = true,
    .request_file = "-",
};

static struct sockaddr_in target, source;
static char *request;
static size_t request_len;

static struct conn *conns;
static uint32_t free_head = UINT32_MAX;
static long outstanding, max_outstanding;
static int epfd;

/* Every connection started, in order (room for all N: no wrap-around); their deadlines are in
 * the same order (one --timeout for all), so the head is always the first to expire. An entry
 * whose slot has been finished (and perhaps reused) since is recognised by the generation. */
static struct {
    uint32_t slot;
    uint32_t gen;
} *fifo;
static size_t fifo_cap, fifo_head, fifo_len;

static long due, sent, skipped, answered;
static long statuses[600]; /* 0: unreadable status line */
static long connect_errors[N_ERRNO + 1];
static long reset_before_status, closed_before_status;
static long timeout_connect, timeout_status;
static double *latencies, *lags;
static long n_lat, n_lag;
static double first_sent, last_sent;

static _Noreturn void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("floodload: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double wall(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void count_errno(int e) {
    connect_errors[e > 0 && e < N_ERRNO ? e : N_ERRNO]++;
}

/* Close a connection: an RST (SO_LINGER 0) when `rst`, else a normal close. */
static void finish(uint32_t i, bool rst) {
    struct conn *c = &conns[i];
    if (rst) {
        struct linger lg = {.l_onoff = 1, .l_linger = 0};
        setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
    close(c->fd); /* also removes it from the epoll set */
    c->fd = -1;
    c->state = S_FREE;
    c->next_free = free_head;
    free_head = i;
    outstanding--;
}

static void status_line_done(uint32_t i, double now) {
    struct conn *c = &conns[i];
    int code = 0;
    if (c->have >= 12 && memcmp(c->line, "HTTP/1.", 7) == 0 && c->line[8] == ' ') {
        int d0 = c->line[9] - '0', d1 = c->line[10] - '0', d2 = c->line[11] - '0';
        if (d0 >= 1 && d0 <= 5 && d1 >= 0 && d1 <= 9 && d2 >= 0 && d2 <= 9)
            code = d0 * 100 + d1 * 10 + d2;
    }
    statuses[code]++;
    answered++;
    latencies[n_lat++] = now - c->started;
    if (opt.close_rst) {
        finish(i, true);
    } else {
        c->state = S_DRAIN;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.u32 = i};
        epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    }
}

static void start_one(double now) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        count_errno(errno);
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&source, sizeof source) < 0 ||
        (connect(fd, (struct sockaddr *)&target, sizeof target) < 0 && errno != EINPROGRESS)) {
        count_errno(errno);
        close(fd);
        return;
    }
    uint32_t i = free_head;
    struct conn *c = &conns[i];
    free_head = c->next_free;
    c->fd = fd;
    c->state = S_CONNECTING;
    c->sent_bytes = 0;
    c->have = 0;
    c->started = now;
    c->gen++;
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN | EPOLLRDHUP, .data.u32 = i};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl: %s", strerror(errno));
    outstanding++;
    if (outstanding > max_outstanding) max_outstanding = outstanding;
    if (fifo_head + fifo_len >= fifo_cap) die("internal: the connection list is full");
    fifo[fifo_head + fifo_len].slot = i;
    fifo[fifo_head + fifo_len].gen = c->gen;
    fifo_len++;
}

static void on_socket(uint32_t i, uint32_t events, double now) {
    struct conn *c = &conns[i];
    if (c->state == S_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
        if (err != 0) {
            count_errno(err);
            finish(i, false);
            return;
        }
        if (!(events & (EPOLLOUT | EPOLLIN | EPOLLHUP | EPOLLERR))) return;
        c->state = S_SENDING;
    }
    if (c->state == S_SENDING) {
        if (events & (EPOLLOUT | EPOLLHUP | EPOLLERR)) {
            ssize_t w = send(c->fd, request + c->sent_bytes, request_len - c->sent_bytes,
                             MSG_NOSIGNAL);
            if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
                reset_before_status++;
                finish(i, true);
                return;
            }
            if (w > 0) c->sent_bytes += (uint32_t)w;
            if (c->sent_bytes < request_len) return;
            c->state = S_STATUS;
            struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.u32 = i};
            epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
        }
        if (!(events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) return;
    }
    if (c->state == S_STATUS) {
        ssize_t r = recv(c->fd, c->line + c->have, STATUS_LINE_BYTES - c->have, 0);
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        if (r <= 0) {
            if (r < 0) reset_before_status++;
            else closed_before_status++;
            finish(i, true);
            return;
        }
        uint32_t from = c->have ? c->have - 1 : 0;
        c->have += (uint32_t)r;
        if (memmem(c->line + from, c->have - from, "\r\n", 2) != NULL ||
            c->have >= STATUS_LINE_BYTES)
            status_line_done(i, now);
        return;
    }
    if (c->state == S_DRAIN) {
        char sink[4096];
        ssize_t r = recv(c->fd, sink, sizeof sink, 0);
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        if (r <= 0) finish(i, r < 0); /* closed by the gateway: a normal close */
    }
}

/* Time out the oldest outstanding connections whose --timeout has passed. */
static void expire(double now, bool all) {
    while (fifo_len > 0) {
        uint32_t i = fifo[fifo_head].slot;
        struct conn *c = &conns[i];
        bool live = c->state != S_FREE && c->gen == fifo[fifo_head].gen;
        if (live && !all && now - c->started < opt.timeout) break;
        fifo_head++;
        fifo_len--;
        if (!live) continue;
        if (c->state == S_DRAIN) {
            finish(i, true); /* answered; the gateway just has not closed yet */
            continue;
        }
        if (c->state == S_CONNECTING) timeout_connect++;
        else timeout_status++;
        finish(i, true);
    }
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of a sorted array, in ms (null if empty). */
static void pct_json(const double *v, long n, double p, const char *key, bool comma) {
    if (n == 0) {
        printf("\"%s\":null%s", key, comma ? "," : "");
        return;
    }
    long k = (long)(p / 100.0 * (double)n + 0.999999999);
    if (k < 1) k = 1;
    if (k > n) k = n;
    printf("\"%s\":%.3f%s", key, v[k - 1] * 1000.0, comma ? "," : "");
}

static void summary_json(const char *key, double *v, long n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    printf("\"%s\":{", key);
    pct_json(v, n, 50, "p50", true);
    pct_json(v, n, 99, "p99", true);
    pct_json(v, n, 100, "max", false);
    printf("}");
}

static void samples_json(const char *key, const double *v, long n) {
    printf(",\"%s\":[", key);
    for (long i = 0; i < n; i++) printf(i ? ",%.3f" : "%.3f", v[i] * 1000.0);
    printf("]");
}

static void report(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("{\"type\":\"result\",\"due\":%ld,\"sent\":%ld,\"skipped\":%ld,\"answered\":%ld,", due,
           sent, skipped, answered);
    printf("\"statuses\":{");
    bool first = true;
    for (int s = 0; s < 600; s++)
        if (statuses[s]) {
            printf("%s\"%d\":%ld", first ? "" : ",", s, statuses[s]);
            first = false;
        }
    printf("},\"connect_errors\":{");
    first = true;
    for (int e = 1; e <= N_ERRNO; e++)
        if (connect_errors[e]) {
            const char *name = e < N_ERRNO ? strerrorname_np(e) : NULL;
            if (name != NULL) printf("%s\"%s\":%ld", first ? "" : ",", name, connect_errors[e]);
            else printf("%s\"errno %d\":%ld", first ? "" : ",", e, connect_errors[e]);
            first = false;
        }
    printf("},\"errors\":{\"reset before status\":%ld,\"closed before status\":%ld},",
           reset_before_status, closed_before_status);
    printf("\"timeouts\":{\"connect\":%ld,\"status\":%ld},", timeout_connect, timeout_status);
    summary_json("latency_ms", latencies, n_lat);
    printf(",");
    summary_json("lag_ms", lags, n_lag);
    printf(",\"send_window_s\":%.6f,\"first_sent\":%.6f,\"last_sent\":%.6f,",
           last_sent - first_sent, first_sent, last_sent);
    printf("\"max_outstanding\":%ld,", max_outstanding);
    printf("\"cpu_user\":%.3f,\"cpu_sys\":%.3f",
           (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6,
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6);
    if (opt.samples) {
        /* sorted by summary_json above: merging several processes' samples does not care */
        samples_json("latency_samples_ms", latencies, n_lat);
        samples_json("lag_samples_ms", lags, n_lag);
    }
    printf("}\n");
    fflush(stdout);
}

static double num_arg(const char *name, const char *v, double lo, double hi) {
    char *end;
    double d = strtod(v, &end);
    if (*v == '\0' || *end != '\0' || !(d >= lo && d <= hi))
        die("%s: expected a number in [%g, %g], got %s", name, lo, hi, v);
    return d;
}

static void loopback_addr(const char *name, const char *host, struct sockaddr_in *out, int port) {
    memset(out, 0, sizeof *out);
    out->sin_family = AF_INET;
    out->sin_port = htons((uint16_t)port);
    if (strcmp(host, "localhost") == 0) host = "127.0.0.1";
    if (inet_pton(AF_INET, host, &out->sin_addr) != 1 || (ntohl(out->sin_addr.s_addr) >> 24) != 127)
        die("%s: only loopback (127.0.0.0/8 or localhost) is allowed, got %s", name, host);
}

static void parse_args(int argc, char **argv) {
    const char *host = "127.0.0.1", *src = "127.0.0.1";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define ARG(name) (strcmp(a, name) == 0 && (v != NULL || (die("%s needs a value", name), 0)) && ++i)
        if (ARG("--host"))
            host = v;
        else if (ARG("--source"))
            src = v;
        else if (ARG("--port"))
            opt.port = (int)num_arg(a, v, 1, 65535);
        else if (ARG("--rate"))
            opt.rate = num_arg(a, v, 0.001, 1e6);
        else if (ARG("--seconds"))
            opt.seconds = num_arg(a, v, 0.001, 3600);
        else if (ARG("--max-count"))
            opt.max_count = (long)num_arg(a, v, 1, MAX_COUNT);
        else if (ARG("--max-in-flight"))
            opt.max_in_flight = (long)num_arg(a, v, 1, 1000000);
        else if (ARG("--timeout"))
            opt.timeout = num_arg(a, v, 0.001, 600);
        else if (ARG("--start-at"))
            opt.start_at = num_arg(a, v, 0, 1e11);
        else if (ARG("--close")) {
            if (strcmp(v, "rst") != 0 && strcmp(v, "wait") != 0) die("--close: rst or wait");
            opt.close_rst = strcmp(v, "rst") == 0;
        } else if (ARG("--request-file"))
            opt.request_file = v;
        else if (strcmp(a, "--samples") == 0)
            opt.samples = true;
        else
            die("unknown argument %s (see the comment at the top of bench/floodload.c)", a);
#undef ARG
    }
    if (opt.port == 0 || opt.rate == 0 || opt.seconds == 0)
        die("--port, --rate and --seconds are required");
    loopback_addr("--host", host, &target, opt.port);
    loopback_addr("--source", src, &source, 0);
}

static void read_request(void) {
    int fd = strcmp(opt.request_file, "-") == 0 ? STDIN_FILENO : open(opt.request_file, O_RDONLY);
    if (fd < 0) die("%s: %s", opt.request_file, strerror(errno));
    request = malloc(MAX_REQUEST_BYTES + 1);
    if (request == NULL) die("out of memory");
    for (int reads = 0; reads < 100000; reads++) {
        ssize_t r = read(fd, request + request_len, MAX_REQUEST_BYTES + 1 - request_len);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) die("reading the request: %s", strerror(errno));
        if (r == 0) break;
        request_len += (size_t)r;
        if (request_len > MAX_REQUEST_BYTES) die("the request is over %d bytes", MAX_REQUEST_BYTES);
    }
    if (fd != STDIN_FILENO) close(fd);
    if (request_len == 0) die("empty request");
}

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
        (rlim_t)opt.max_in_flight + 16 > rl.rlim_cur)
        die("--max-in-flight %ld does not fit RLIMIT_NOFILE %llu", opt.max_in_flight,
            (unsigned long long)rl.rlim_cur);
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    read_request();
    raise_nofile();
    signal(SIGPIPE, SIG_IGN);

    double total_d = opt.rate * opt.seconds;
    long total = total_d < (double)opt.max_count ? (long)total_d : opt.max_count;
    if (total < 1) total = 1;
    conns = calloc((size_t)opt.max_in_flight, sizeof *conns);
    fifo_cap = (size_t)total;
    fifo = calloc(fifo_cap, sizeof *fifo);
    latencies = calloc((size_t)total, sizeof *latencies);
    lags = calloc((size_t)total, sizeof *lags);
    if (conns == NULL || fifo == NULL || latencies == NULL || lags == NULL) die("out of memory");
    for (long i = opt.max_in_flight - 1; i >= 0; i--) {
        conns[i].fd = -1;
        conns[i].next_free = free_head;
        free_head = (uint32_t)i;
    }

    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1: %s", strerror(errno));
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (tfd < 0) die("timerfd_create: %s", strerror(errno));
    struct epoll_event tev = {.events = EPOLLIN, .data.u32 = TIMER_TAG};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, tfd, &tev) < 0) die("epoll_ctl: %s", strerror(errno));

    /* Wait for --start-at (bounded), then the schedule's origin is the monotonic clock. */
    double wait = opt.start_at > 0 ? opt.start_at - wall() : 0;
    if (wait > 60) die("--start-at is %.0f s ahead (at most 60)", wait);
    alarm((unsigned)(opt.seconds + 2 * opt.timeout + 30 + (wait > 0 ? wait : 0)));
    if (wait > 0) {
        struct timespec ts = {.tv_sec = (time_t)wait,
                              .tv_nsec = (long)((wait - (double)(time_t)wait) * 1e9)};
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
        }
    }
    long period_ns = (long)(1e9 / opt.rate);
    if (period_ns < MIN_PERIOD_NS) period_ns = MIN_PERIOD_NS;
    struct itimerspec its = {
        .it_interval = {.tv_sec = period_ns / 1000000000L, .tv_nsec = period_ns % 1000000000L},
        .it_value = {.tv_sec = 0, .tv_nsec = 1},
    };
    if (timerfd_settime(tfd, 0, &its, NULL) < 0) die("timerfd_settime: %s", strerror(errno));

    double t0 = mono();
    double send_end = t0 + opt.seconds + 1.0; /* the schedule's time bound */
    long k = 0;
    bool sending = true;
    double drain_end = 0;
    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(epfd, evs, MAX_EVENTS, 100);
        if (n < 0 && errno != EINTR) die("epoll_wait: %s", strerror(errno));
        double now = mono();
        for (int e = 0; e < n; e++) {
            uint32_t tag = evs[e].data.u32;
            if (tag == TIMER_TAG) {
                uint64_t ticks;
                if (read(tfd, &ticks, sizeof ticks) < 0 && errno != EAGAIN)
                    die("timerfd read: %s", strerror(errno));
                continue;
            }
            if (conns[tag].state != S_FREE) on_socket(tag, evs[e].events, now);
        }
        if (sending) {
            now = mono();
            long should = (long)((now - t0) * opt.rate) + 1;
            if (should > total) should = total;
            if (should > k) lags[n_lag++] = now - (t0 + (double)k / opt.rate);
            for (; k < should; k++) {
                due++;
                if (outstanding >= opt.max_in_flight) {
                    skipped++;
                    continue;
                }
                start_one(now);
                sent++;
                if (sent == 1) first_sent = now;
                last_sent = now;
            }
            if (k >= total || now >= send_end) {
                due += total - k; /* not reached within the time bound */
                sending = false;
                drain_end = now + opt.timeout + 1.0;
                struct itimerspec off = {0};
                timerfd_settime(tfd, 0, &off, NULL);
            }
        }
        expire(now, false);
        if (!sending && (outstanding == 0 || now >= drain_end)) {
            expire(now, true);
            break;
        }
    }
    report();
    return 0;
}
