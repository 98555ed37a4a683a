/*
 * sseload: a native SSE load client for bench/compare.py (built and driven by bench/cload.py).
 *
 * Usage: sseload --port PORT --path /events/t0 -n N [--topics T] [--sample-every K]
 *                [--seq-from data|id] [--no-reconnect] [--cycle-delay S] [--parallel P]
 *                [--connect-timeout S] [--max-seconds S] [--max-samples M] [--http10]
 *
 * One thread, Linux epoll, edge-triggered, non-blocking sockets: a ready socket is read until a
 * read returns less than the buffer (for a stream socket that means it is drained, epoll(7)), so
 * one read() per wakeup in the usual case, with neither an extra read to see EAGAIN nor the
 * re-poll of every ready socket that level-triggering costs. The exception is the peer's FIN: a
 * read stops short at it with data, and no new edge follows, so when the event carries
 * EPOLLRDHUP (or HUP/ERR) the socket is read until 0 or EAGAIN. It opens N streams to 127.0.0.1:PORT (only loopback hosts are accepted), spread over T
 * topic paths like bench/client.py's topic_paths (T > 1: PATH0, PATH1, ... round-robin), sending
 * `GET PATH HTTP/1.1` with Host, Accept: text/event-stream, Cache-Control: no-cache and, when a
 * stream is reopened, Last-Event-ID. Per read it de-chunks in place (a chunk-size line may be
 * split across reads, several chunks may share one; un-chunked bodies end at close), splits the
 * SSE stream into lines (LF or CRLF) and events (blank line), and per event takes the sequence
 * from the data's `"seq":N` (default) or from the `id:` line (--seq-from id), and, while latency
 * is recorded, the send time from the data's `"t":<seconds since the epoch>`. One event in every
 * K, counted over all connections, is a latency sample: receive time (CLOCK_REALTIME when the
 * read is processed) minus send time.
 *
 * Per connection: events, last seq, lost (sum of forward seq jumps), gaps (how many jumps), dups
 * (a seq <= the last one), last `id:` value. A stream the server ends (close, reset, last chunk,
 * or a broken frame after the headers) is counted as an end and reopened at once with
 * Last-Event-ID (unless --no-reconnect); a failed reopen is retried every 0.5 s, at most 20 times,
 * then the connection stays closed. Churn (`churn` command) closes R random open streams a second
 * (in 10 steps) and reopens each --cycle-delay seconds later the same way. Counters carry over a
 * reopen, so events lost or repeated across it show up as gaps or dups.
 *
 * Control: line commands on stdin, one JSON line answered on stdout for each, in order (a command
 * is read only once the previous one is answered):
 *
 *   connect [S]        open the N streams, at most --parallel connecting at once (TCP connect +
 *                      response headers within --connect-timeout each); answered when every one
 *                      has connected or failed, or after S seconds (those not connected by then
 *                      count as failed): {"type":"connect","connected":n,"failed":{..},..}
 *   wait-first S       answered when every open stream has had an event, or after S seconds:
 *                      {"type":"wait-first","waiting":n,"seconds":s}
 *   snapshot           totals over the connections that connected (as bench.client's Snapshot),
 *                      "silent": of those, how many got no event since the previous snapshot,
 *                      the latency samples recorded since the previous snapshot (seconds, at
 *                      most --max-samples, the rest counted in "samples_dropped"), and this
 *                      process's own CPU time and max RSS (getrusage)
 *   record on|off      start / stop recording latency samples
 *   churn R S          cycle R streams a second for S seconds (R = 0 stops)
 *   stop               close everything, answer {"type":"stopped",..} and exit 0
 *
 * End of stdin is `stop` without the answer. Bounds: N <= 200,000 and below RLIMIT_NOFILE (the
 * soft limit is raised to the hard one first); a response header over 64 KiB, a chunk-size line
 * over 1 KiB or an event (or pending line) over 4 MiB fails the stream; the process exits by
 * itself (status 3) after --max-seconds (default 600) whatever it is doing.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
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
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 200000
#define MAX_HEADER_BYTES (64 * 1024)
#define MAX_TAIL_BYTES (4 * 1024 * 1024)
#define MAX_CHUNK_LINE_BYTES 1024
#define CHUNK_LINE_KEEP 24  /* bytes of a split chunk-size line kept: the hex size fits */
#define MAX_ID_BYTES 128    /* a longer `id:` is not tracked (the previous one stays) */
#define MAX_PATH_BYTES 2048
#define READ_BUF_BYTES (256 * 1024)
#define MAX_EVENTS 1024
#define REOPEN_ATTEMPTS 20
#define REOPEN_DELAY 0.5
#define CMD_MAX 4096
#define STDIN_TAG UINT32_MAX

enum state {
    ST_IDLE,       /* not started yet (initial connect pending) */
    ST_CONNECTING, /* TCP connect in progress, or the request not fully sent */
    ST_HEADERS,    /* request sent, waiting for the response headers */
    ST_STREAMING,
    ST_WAIT, /* closed, to be reopened at `deadline` */
    ST_DEAD, /* closed for good */
};

/* Why a connect or reopen attempt failed, or why a stream broke. */
enum reason {
    R_REFUSED,
    R_TIMEOUT,
    R_RESET,
    R_CLOSED_BEFORE_HEADERS,
    R_BAD_STATUS,
    R_HEADER_TOO_LONG,
    R_BAD_CHUNK,
    R_TAIL_TOO_LONG,
    R_SOCKET,
    R_CONNECT,
    R_IO,
    R_CLOSED,     /* a started stream closed by the server */
    R_LAST_CHUNK, /* a started stream ended with the zero-size chunk */
    R_PHASE,      /* still connecting when the `connect` command's deadline came */
    R_COUNT
};
static const char *const REASON_NAMES[R_COUNT] = {
    "refused", "timeout", "reset",  "closed_before_headers", "bad_status", "header_too_long",
    "bad_chunk", "tail_too_long", "socket", "connect", "io", "closed", "last_chunk",
    "connect_phase_timed_out",
};

struct conn {
    int fd;
    uint8_t state;
    bool in_load;   /* its first connect succeeded: part of every total (bench.client's conns) */
    bool errored;   /* a protocol failure happened on it (sticky) */
    bool cycling;   /* closed on purpose, to be reopened */
    bool chunked;
    bool reopening; /* the current attempt is a reopen, not the first connect */
    bool ev_has_seq, ev_has_t, ev_has_id;
    uint8_t last_id_len, ev_id_len;
    uint16_t req_off;    /* request bytes already sent */
    uint16_t cl_len;     /* length of a split chunk-size line so far */
    uint8_t attempts;
    uint32_t topic;
    double deadline; /* CLOCK_MONOTONIC: connect/header timeout, or when to reopen */
    struct conn *tprev, *tnext; /* the timed list: every conn with a deadline */
    /* HTTP */
    char *head;
    uint32_t head_len, head_cap;
    int64_t chunk_left; /* >0 data bytes to come, -2/-1: CR/LF after the data, 0: size line */
    char cl[CHUNK_LINE_KEEP];
    /* SSE */
    char *line; /* a line split across reads */
    uint32_t line_len, line_cap;
    uint32_t ev_bytes; /* bytes of the event so far */
    int64_t ev_seq;
    double ev_t;
    char ev_id[MAX_ID_BYTES];
    char last_id[MAX_ID_BYTES];
    /* counters */
    uint64_t events, events_at_snap;
    int64_t last_seq;
    uint64_t lost, gaps, dups;
    uint32_t ends, reopens, cycles;
};

struct buf {
    char *p;
    size_t len, cap;
};

/* --- options ------------------------------------------------------------------------------- */

static struct {
    int port;
    const char *path;
    long n;
    long topics;
    long sample_every;
    bool seq_from_id;
    bool reconnect;
    bool http10;
    double cycle_delay;
    long parallel;
    double connect_timeout;
    double max_seconds;
    long max_samples;
} opt = {
    .port = 0,
    .path = NULL,
    .n = 100,
    .topics = 1,
    .sample_every = 10,
    .seq_from_id = false,
    .reconnect = true,
    .http10 = false,
    .cycle_delay = 0.5,
    .parallel = 200,
    .connect_timeout = 10.0,
    .max_seconds = 600.0,
    .max_samples = 1000000,
};

/* --- state --------------------------------------------------------------------------------- */

static struct conn *conns;
static int epfd = -1;
static struct sockaddr_in target;
static char rbuf[READ_BUF_BYTES];
static double now_mono; /* refreshed once per loop turn */
static double started_at;

static struct conn *timed_head;
static long next_initial;      /* next conn index to start for the first time */
static long initial_inflight;  /* first connects not resolved yet */
static long initial_resolved;
static bool connect_phase;
static double connect_started;
static long in_load_count;
static uint64_t failed[R_COUNT];
static uint64_t reopen_failed[R_COUNT];
static uint64_t broken[R_COUNT]; /* streams broken after their headers, by reason */

static long countdown;
static bool recording;
static double *samples;
static long n_samples;
static uint64_t samples_dropped;

static double churn_rate, churn_until, churn_next, churn_carry;
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static long *perm; /* indices of in-load conns for sampling without replacement */

enum pending { P_NONE, P_CONNECT, P_WAIT_FIRST };
static enum pending pending;
static double pending_until, pending_started;

static char cmdbuf[CMD_MAX];
static size_t cmdlen;
static bool stdin_open = true;

/* --- small helpers ------------------------------------------------------------------------- */

static _Noreturn void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("sseload: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double wall(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t rng(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1Dull;
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n);
    if (q == NULL) die("out of memory (%zu bytes)", n);
    return q;
}

static void buf_reserve(struct buf *b, size_t extra) {
    if (b->len + extra <= b->cap) return;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra) cap *= 2;
    b->p = xrealloc(b->p, cap);
    b->cap = cap;
}

static void buf_printf(struct buf *b, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        size_t room = b->cap - b->len;
        int n = vsnprintf(b->p ? b->p + b->len : NULL, room, fmt, ap);
        va_end(ap);
        if (n < 0) die("vsnprintf failed");
        if ((size_t)n < room) {
            b->len += (size_t)n;
            return;
        }
        buf_reserve(b, (size_t)n + 1);
    }
}

static void emit(struct buf *b) {
    /* One JSON line on stdout (blocking: the runner reads every answer). */
    buf_printf(b, "\n");
    size_t off = 0;
    while (off < b->len) {
        ssize_t w = write(STDOUT_FILENO, b->p + off, b->len - off);
        if (w < 0) {
            if (errno == EINTR) continue;
            exit(4); /* the runner is gone */
        }
        off += (size_t)w;
    }
    b->len = 0;
}

static bool lower_eq(const char *s, size_t n, const char *lit) {
    size_t m = strlen(lit);
    if (n != m) return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c >= 'A' && c <= 'Z') c = (char)(c + 32);
        if (c != lit[i]) return false;
    }
    return true;
}

static bool contains_lower(const char *s, size_t n, const char *lit) {
    size_t m = strlen(lit);
    for (size_t i = 0; i + m <= n; i++)
        if (lower_eq(s + i, m, lit)) return true;
    return false;
}

/* --- the timed list ------------------------------------------------------------------------ */

static void timed_add(struct conn *c, double deadline) {
    c->deadline = deadline;
    if (c->tprev != NULL || timed_head == c) return; /* already listed */
    c->tnext = timed_head;
    c->tprev = NULL;
    if (timed_head != NULL) timed_head->tprev = c;
    timed_head = c;
}

static void timed_remove(struct conn *c) {
    if (c->tprev == NULL && timed_head != c) return;
    if (c->tprev != NULL)
        c->tprev->tnext = c->tnext;
    else
        timed_head = c->tnext;
    if (c->tnext != NULL) c->tnext->tprev = c->tprev;
    c->tprev = c->tnext = NULL;
}

/* --- connection life ----------------------------------------------------------------------- */

static void close_fd(struct conn *c) {
    if (c->fd >= 0) {
        close(c->fd); /* also removes it from the epoll set */
        c->fd = -1;
    }
}

static void reset_parser(struct conn *c) {
    c->head_len = 0;
    c->chunked = false;
    c->chunk_left = 0;
    c->cl_len = 0;
    c->line_len = 0;
    c->ev_bytes = 0;
    c->ev_has_seq = c->ev_has_t = c->ev_has_id = false;
    c->req_off = 0;
}

static void release_buffers(struct conn *c) {
    free(c->head);
    c->head = NULL;
    c->head_cap = c->head_len = 0;
    if (c->line_cap > 64 * 1024) { /* keep a small one for the next stream */
        free(c->line);
        c->line = NULL;
        c->line_cap = c->line_len = 0;
    }
}

static void start_attempt(struct conn *c);

static void initial_done(void) {
    initial_inflight--;
    initial_resolved++;
}

/* An attempt (first connect or reopen) failed before the stream started. */
static void attempt_failed(struct conn *c, enum reason why) {
    close_fd(c);
    release_buffers(c);
    if (why == R_BAD_STATUS || why == R_HEADER_TOO_LONG || why == R_BAD_CHUNK ||
        why == R_TAIL_TOO_LONG)
        c->errored = true;
    if (!c->reopening) {
        failed[why]++;
        c->state = ST_DEAD;
        timed_remove(c);
        initial_done();
        return;
    }
    reopen_failed[why]++;
    c->attempts++;
    if (c->attempts >= REOPEN_ATTEMPTS) {
        c->state = ST_DEAD;
        c->cycling = false;
        timed_remove(c);
        return;
    }
    c->state = ST_WAIT;
    timed_add(c, now_mono + REOPEN_DELAY);
}

/* The response headers were a 200: the stream is on. */
static void stream_started(struct conn *c) {
    c->state = ST_STREAMING;
    timed_remove(c);
    free(c->head);
    c->head = NULL;
    c->head_cap = c->head_len = 0;
    if (c->reopening) {
        c->reopens++;
        c->cycling = false;
        c->attempts = 0;
    } else {
        c->in_load = true;
        in_load_count++;
        c->events_at_snap = c->events;
        initial_done();
    }
}

/* A started stream is over: the server ended it, or it broke. */
static void stream_lost(struct conn *c, enum reason why, bool protocol) {
    close_fd(c);
    release_buffers(c);
    broken[why]++;
    if (protocol) c->errored = true;
    if (!opt.reconnect) {
        c->state = ST_DEAD;
        return;
    }
    c->ends++;
    c->reopening = true;
    c->attempts = 0;
    c->state = ST_WAIT;
    timed_add(c, now_mono); /* at once */
}

static void cycle(struct conn *c) {
    if (c->state != ST_STREAMING || c->cycling) return;
    close_fd(c);
    release_buffers(c);
    c->cycles++;
    c->cycling = true;
    c->reopening = true;
    c->attempts = 0;
    c->state = ST_WAIT;
    timed_add(c, now_mono + opt.cycle_delay);
}

static size_t build_request(const struct conn *c, char *out, size_t cap) {
    char path[MAX_PATH_BYTES + 24];
    if (opt.topics > 1)
        snprintf(path, sizeof path, "%s%" PRIu32, opt.path, c->topic);
    else
        snprintf(path, sizeof path, "%s", opt.path);
    int n;
    if (c->last_id_len > 0 && c->reopening)
        n = snprintf(out, cap,
                     "GET %s HTTP/1.%c\r\nHost: 127.0.0.1:%d\r\nAccept: text/event-stream\r\n"
                     "Cache-Control: no-cache\r\nLast-Event-ID: %.*s\r\n\r\n",
                     path, opt.http10 ? '0' : '1', opt.port, (int)c->last_id_len, c->last_id);
    else
        n = snprintf(out, cap,
                     "GET %s HTTP/1.%c\r\nHost: 127.0.0.1:%d\r\nAccept: text/event-stream\r\n"
                     "Cache-Control: no-cache\r\n\r\n",
                     path, opt.http10 ? '0' : '1', opt.port);
    if (n < 0 || (size_t)n >= cap) die("request too long");
    return (size_t)n;
}

static void send_request(struct conn *c) {
    char req[MAX_PATH_BYTES + MAX_ID_BYTES + 256];
    size_t len = build_request(c, req, sizeof req);
    while (c->req_off < len) {
        ssize_t w = send(c->fd, req + c->req_off, len - c->req_off, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return; /* EPOLLOUT again */
            attempt_failed(c, errno == ECONNREFUSED ? R_REFUSED : R_RESET);
            return;
        }
        c->req_off = (uint16_t)(c->req_off + (size_t)w);
    }
    /* MOD re-checks readiness: bytes already queued are reported. */
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | EPOLLET,
                             .data.u32 = (uint32_t)(c - conns)};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl MOD: %s", strerror(errno));
    c->state = ST_HEADERS;
}

static void start_attempt(struct conn *c) {
    reset_parser(c);
    c->state = ST_CONNECTING;
    timed_add(c, now_mono + opt.connect_timeout);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        attempt_failed(c, R_SOCKET);
        return;
    }
    c->fd = fd;
    int r = connect(fd, (struct sockaddr *)&target, sizeof target);
    if (r < 0 && errno != EINPROGRESS) {
        attempt_failed(c, errno == ECONNREFUSED ? R_REFUSED : R_CONNECT);
        return;
    }
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLET, .data.u32 = (uint32_t)(c - conns)};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl ADD: %s", strerror(errno));
}

static void start_initial_connects(void) {
    while (connect_phase && next_initial < opt.n && initial_inflight < opt.parallel) {
        struct conn *c = &conns[next_initial++];
        initial_inflight++;
        c->reopening = false;
        start_attempt(c);
    }
}

/* --- parsing ------------------------------------------------------------------------------- */

static bool parse_uint(const char *p, const char *end, int64_t *out, const char **stop) {
    int64_t v = 0;
    const char *s = p;
    while (p < end && *p >= '0' && *p <= '9') {
        if (v > (INT64_MAX - 9) / 10) return false;
        v = v * 10 + (*p - '0');
        p++;
    }
    if (p == s) return false;
    *out = v;
    if (stop != NULL) *stop = p;
    return true;
}

/* `digits.digits` as bench.upstream writes it ("%.6f"). */
static bool parse_time(const char *p, const char *end, double *out) {
    int64_t whole, frac = 0;
    const char *q;
    if (!parse_uint(p, end, &whole, &q)) return false;
    double v = (double)whole;
    if (q < end && *q == '.') {
        const char *f = q + 1;
        const char *r;
        if (!parse_uint(f, end, &frac, &r)) return false;
        if (r - f > 18) return false;
        double scale = 1.0;
        for (const char *x = f; x < r; x++) scale *= 10.0;
        v += (double)frac / scale;
    }
    *out = v;
    return true;
}

static void dispatch_event(struct conn *c) {
    if (c->ev_has_id) {
        memcpy(c->last_id, c->ev_id, c->ev_id_len);
        c->last_id_len = c->ev_id_len;
    }
    if (c->ev_has_seq) {
        int64_t seq = c->ev_seq, last = c->last_seq;
        c->events++;
        if (seq > last) {
            if (last >= 0 && seq != last + 1) {
                c->lost += (uint64_t)(seq - last - 1);
                c->gaps++;
            }
            c->last_seq = seq;
        } else {
            c->dups++;
        }
        if (--countdown <= 0) {
            countdown = opt.sample_every;
            if (recording && c->ev_has_t) {
                if (n_samples < opt.max_samples)
                    samples[n_samples++] = wall() - c->ev_t;
                else
                    samples_dropped++;
            }
        }
    }
    c->ev_bytes = 0;
    c->ev_has_seq = c->ev_has_t = c->ev_has_id = false;
}

static void sse_line(struct conn *c, const char *s, size_t len) {
    if (len > 0 && s[len - 1] == '\r') len--;
    if (len == 0) {
        dispatch_event(c);
        return;
    }
    c->ev_bytes += (uint32_t)len + 1;
    const char *end = s + len;
    if (len >= 5 && memcmp(s, "data:", 5) == 0) {
        if (!opt.seq_from_id && !c->ev_has_seq) {
            const char *k = memmem(s + 5, len - 5, "\"seq\":", 6);
            if (k != NULL && parse_uint(k + 6, end, &c->ev_seq, NULL)) c->ev_has_seq = true;
        }
        if (recording && !c->ev_has_t) {
            const char *k = memmem(s + 5, len - 5, "\"t\":", 4);
            if (k != NULL && parse_time(k + 4, end, &c->ev_t)) c->ev_has_t = true;
        }
    } else if (len >= 3 && memcmp(s, "id:", 3) == 0) {
        const char *v = s + 3;
        if (v < end && *v == ' ') v++;
        size_t vlen = (size_t)(end - v);
        if (vlen < MAX_ID_BYTES && memchr(v, '\0', vlen) == NULL) { /* else: not tracked */
            memcpy(c->ev_id, v, vlen);
            c->ev_id_len = (uint8_t)vlen;
            c->ev_has_id = true;
        }
        if (opt.seq_from_id) {
            const char *stop;
            if (parse_uint(v, end, &c->ev_seq, &stop) && stop == end) c->ev_has_seq = true;
        }
    }
}

static bool line_append(struct conn *c, const char *p, size_t n) {
    if ((size_t)c->line_len + n + c->ev_bytes > MAX_TAIL_BYTES) return false;
    if (c->line_len + n > c->line_cap) {
        size_t cap = c->line_cap ? c->line_cap : 512;
        while (cap < c->line_len + n) cap *= 2;
        c->line = xrealloc(c->line, cap);
        c->line_cap = (uint32_t)cap;
    }
    memcpy(c->line + c->line_len, p, n);
    c->line_len += (uint32_t)n;
    return true;
}

/* Feed body bytes (de-chunked) to the SSE parser; false if the event grew past the bound. */
static bool sse_feed(struct conn *c, const char *p, size_t n) {
    const char *end = p + n;
    if (c->line_len > 0) {
        const char *nl = memchr(p, '\n', n);
        if (nl == NULL) return line_append(c, p, n);
        if (!line_append(c, p, (size_t)(nl - p))) return false;
        sse_line(c, c->line, c->line_len);
        c->line_len = 0;
        p = nl + 1;
    }
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        if (nl == NULL) return line_append(c, p, (size_t)(end - p));
        sse_line(c, p, (size_t)(nl - p));
        p = nl + 1;
    }
    return c->ev_bytes <= MAX_TAIL_BYTES;
}

static int hexval(char ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

static bool parse_chunk_size(const char *s, size_t n, int64_t *out) {
    if (n > 0 && s[n - 1] == '\r') n--;
    int64_t v = 0;
    size_t i = 0;
    for (; i < n; i++) {
        int h = hexval(s[i]);
        if (h < 0) break;
        if (v > ((int64_t)1 << 40)) return false;
        v = v * 16 + h;
    }
    if (i == 0) return false;
    if (i < n && s[i] != ';' && s[i] != ' ' && s[i] != '\t') return false;
    *out = v;
    return true;
}

/* De-chunk buf[0..n) in place; returns the data length, or -1 on a framing error.
 * *ended is set at the last (zero-size) chunk. */
static ssize_t dechunk(struct conn *c, char *buf, size_t n, bool *ended) {
    size_t r = 0, w = 0;
    int64_t left = c->chunk_left;
    while (r < n) {
        if (left > 0) {
            size_t take = (size_t)left < n - r ? (size_t)left : n - r;
            if (w != r) memmove(buf + w, buf + r, take);
            w += take;
            r += take;
            left -= (int64_t)take;
            if (left == 0) left = -2;
        } else if (left < 0) {
            if (buf[r] != (left == -2 ? '\r' : '\n')) return -1;
            r++;
            left++;
        } else {
            const char *nl = memchr(buf + r, '\n', n - r);
            size_t seg = nl != NULL ? (size_t)(nl - (buf + r)) : n - r;
            if ((size_t)c->cl_len + seg > MAX_CHUNK_LINE_BYTES) return -1;
            int64_t size;
            if (nl == NULL) {
                size_t keep = c->cl_len < CHUNK_LINE_KEEP ? CHUNK_LINE_KEEP - c->cl_len : 0;
                if (keep > 0) memcpy(c->cl + c->cl_len, buf + r, seg < keep ? seg : keep);
                c->cl_len = (uint16_t)(c->cl_len + seg);
                r = n;
                break;
            }
            if (c->cl_len == 0) {
                if (!parse_chunk_size(buf + r, seg, &size)) return -1;
            } else {
                size_t keep = c->cl_len < CHUNK_LINE_KEEP ? CHUNK_LINE_KEEP - c->cl_len : 0;
                if (keep > 0) memcpy(c->cl + c->cl_len, buf + r, seg < keep ? seg : keep);
                size_t have = (size_t)c->cl_len + seg;
                if (!parse_chunk_size(c->cl, have < CHUNK_LINE_KEEP ? have : CHUNK_LINE_KEEP,
                                      &size))
                    return -1;
                c->cl_len = 0;
            }
            r += seg + 1;
            if (size == 0) {
                *ended = true;
                break;
            }
            left = size;
        }
    }
    c->chunk_left = left;
    return (ssize_t)w;
}

/* Parse a complete header block (up to, not including, the blank line). */
static enum reason parse_headers(struct conn *c, const char *h, size_t n) {
    const char *eol = memmem(h, n, "\r\n", 2);
    size_t first = eol != NULL ? (size_t)(eol - h) : n;
    /* "HTTP/1.x 200 ..." */
    if (first < 12 || memcmp(h, "HTTP/1.", 7) != 0 || h[8] != ' ' || memcmp(h + 9, "200", 3) != 0 ||
        (first > 12 && h[12] != ' '))
        return R_BAD_STATUS;
    c->chunked = false;
    const char *p = eol != NULL ? eol + 2 : h + n;
    const char *end = h + n;
    while (p < end) {
        const char *e = memmem(p, (size_t)(end - p), "\r\n", 2);
        if (e == NULL) e = end;
        const char *colon = memchr(p, ':', (size_t)(e - p));
        if (colon != NULL && lower_eq(p, (size_t)(colon - p), "transfer-encoding") &&
            contains_lower(colon + 1, (size_t)(e - colon - 1), "chunked"))
            c->chunked = true;
        p = e + 2;
    }
    return R_COUNT; /* fine */
}

/* Body bytes of a started stream. */
static void body(struct conn *c, char *p, size_t n) {
    bool ended = false;
    if (c->chunked) {
        ssize_t m = dechunk(c, p, n, &ended);
        if (m < 0) {
            stream_lost(c, R_BAD_CHUNK, true);
            return;
        }
        n = (size_t)m;
    }
    if (n > 0 && !sse_feed(c, p, n)) {
        stream_lost(c, R_TAIL_TOO_LONG, true);
        return;
    }
    if (ended) stream_lost(c, R_LAST_CHUNK, false);
}

static void on_headers_data(struct conn *c, char *p, size_t n) {
    const char *block;
    size_t block_len, consumed;
    if (c->head_len == 0) {
        char *e = memmem(p, n, "\r\n\r\n", 4);
        if (e != NULL) {
            block = p;
            block_len = (size_t)(e - p);
            consumed = block_len + 4;
            goto complete;
        }
    }
    {
        /* Buffer at most MAX_HEADER_BYTES + 4 bytes (the block and its blank line). */
        size_t from = c->head_len > 3 ? c->head_len - 3 : 0;
        size_t room = MAX_HEADER_BYTES + 4 - (size_t)c->head_len;
        size_t take = n < room ? n : room;
        if (c->head_len + take > c->head_cap) {
            size_t cap = c->head_cap ? c->head_cap : 1024;
            while (cap < c->head_len + take) cap *= 2;
            c->head = xrealloc(c->head, cap);
            c->head_cap = (uint32_t)cap;
        }
        memcpy(c->head + c->head_len, p, take);
        size_t old = c->head_len;
        c->head_len += (uint32_t)take;
        char *e = memmem(c->head + from, c->head_len - from, "\r\n\r\n", 4);
        if (e == NULL) {
            if (take == room) attempt_failed(c, R_HEADER_TOO_LONG);
            return;
        }
        block = c->head;
        block_len = (size_t)(e - c->head);
        consumed = block_len + 4 - old; /* bytes of this read that belong to the headers */
    }
complete:
    if (block_len > MAX_HEADER_BYTES) {
        attempt_failed(c, R_HEADER_TOO_LONG);
        return;
    }
    {
        enum reason bad = parse_headers(c, block, block_len);
        if (bad != R_COUNT) {
            attempt_failed(c, bad);
            return;
        }
    }
    stream_started(c);
    if (consumed < n) body(c, p + consumed, n - consumed);
}

/* --- socket events ------------------------------------------------------------------------- */

static enum reason errno_reason(int e) {
    if (e == ECONNREFUSED) return R_REFUSED;
    if (e == ECONNRESET || e == EPIPE) return R_RESET;
    return R_IO;
}

static void on_socket(struct conn *c, uint32_t events) {
    if (c->state == ST_CONNECTING) {
        if (c->req_off == 0) {
            int err = 0;
            socklen_t len = sizeof err;
            if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
            if (err != 0) {
                attempt_failed(c, errno_reason(err) == R_IO ? R_CONNECT : errno_reason(err));
                return;
            }
        }
        if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) send_request(c);
        return;
    }
    /* Edge-triggered: read until a short read (drained) or EAGAIN, or to the end after a FIN. */
    bool to_end = (events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0;
    while (c->fd >= 0 && (c->state == ST_HEADERS || c->state == ST_STREAMING)) {
        ssize_t n = read(c->fd, rbuf, sizeof rbuf);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            enum reason why = errno_reason(errno);
            if (c->state == ST_HEADERS)
                attempt_failed(c, why);
            else
                stream_lost(c, why, false);
            return;
        }
        if (n == 0) {
            if (c->state == ST_HEADERS)
                attempt_failed(c, R_CLOSED_BEFORE_HEADERS);
            else
                stream_lost(c, R_CLOSED, false);
            return;
        }
        if (c->state == ST_HEADERS)
            on_headers_data(c, rbuf, (size_t)n);
        else
            body(c, rbuf, (size_t)n);
        if ((size_t)n < sizeof rbuf && !to_end) return;
    }
}

/* --- timers -------------------------------------------------------------------------------- */

static void run_timers(void) {
    struct conn *c = timed_head;
    while (c != NULL) {
        struct conn *next = c->tnext;
        if (c->deadline <= now_mono) {
            if (c->state == ST_CONNECTING || c->state == ST_HEADERS) {
                attempt_failed(c, R_TIMEOUT);
            } else if (c->state == ST_WAIT) {
                timed_remove(c);
                start_attempt(c);
            } else {
                timed_remove(c);
            }
        }
        c = next;
    }
}

static void run_churn(void) {
    if (churn_rate <= 0 || now_mono < churn_next) return;
    if (now_mono >= churn_until) {
        churn_rate = 0;
        return;
    }
    churn_next += 0.1;
    if (churn_next < now_mono) churn_next = now_mono + 0.1;
    churn_carry += churn_rate / 10;
    long k = (long)churn_carry;
    churn_carry -= (double)k;
    /* k random distinct conns of those in the load (a partial Fisher-Yates over `perm`) */
    long m = 0;
    for (long i = 0; i < opt.n; i++)
        if (conns[i].in_load) perm[m++] = i;
    if (k > m) k = m;
    for (long i = 0; i < k; i++) {
        long j = i + (long)(rng() % (uint64_t)(m - i));
        long t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
        cycle(&conns[perm[i]]);
    }
}

/* --- reports ------------------------------------------------------------------------------- */

static void reasons_json(struct buf *b, const char *key, const uint64_t *counts) {
    buf_printf(b, ",\"%s\":{", key);
    bool first = true;
    for (int i = 0; i < R_COUNT; i++) {
        if (counts[i] == 0) continue;
        buf_printf(b, "%s\"%s\":%" PRIu64, first ? "" : ",", REASON_NAMES[i], counts[i]);
        first = false;
    }
    buf_printf(b, "}");
}

static void usage_json(struct buf *b) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    buf_printf(b, ",\"cpu_user\":%.6f,\"cpu_sys\":%.6f,\"maxrss_kib\":%ld",
               (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec * 1e-6,
               (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec * 1e-6, ru.ru_maxrss);
}

static void snapshot(struct buf *b) {
    uint64_t events = 0, lost = 0, gaps = 0, dups = 0, ends = 0, reopens = 0, cycles = 0;
    uint64_t wmin = UINT64_MAX, wmax = 0;
    long closed = 0, errors = 0, silent = 0, open = 0;
    for (long i = 0; i < opt.n; i++) {
        struct conn *c = &conns[i];
        if (!c->in_load) continue;
        events += c->events;
        lost += c->lost;
        gaps += c->gaps;
        dups += c->dups;
        ends += c->ends;
        reopens += c->reopens;
        cycles += c->cycles;
        if (c->state == ST_STREAMING)
            open++;
        else
            closed++;
        if (c->errored) errors++;
        uint64_t d = c->events - c->events_at_snap;
        if (d == 0) silent++;
        if (d < wmin) wmin = d;
        if (d > wmax) wmax = d;
        c->events_at_snap = c->events;
    }
    buf_printf(b,
               "{\"type\":\"snapshot\",\"at\":%.6f,\"conns\":%ld,\"connected\":%ld,\"open\":%ld,"
               "\"events\":%" PRIu64 ",\"lost\":%" PRIu64 ",\"gaps\":%" PRIu64
               ",\"dups\":%" PRIu64 ",\"closed\":%ld,\"errors\":%ld,\"ends\":%" PRIu64
               ",\"reopens\":%" PRIu64 ",\"cycles\":%" PRIu64
               ",\"silent\":%ld,\"window_min\":%" PRIu64 ",\"window_max\":%" PRIu64,
               mono(), opt.n, in_load_count, open, events, lost, gaps, dups, closed, errors,
               ends, reopens, cycles, silent, in_load_count ? wmin : 0, wmax);
    reasons_json(b, "failed", failed);
    reasons_json(b, "reopen_failures", reopen_failed);
    reasons_json(b, "broken", broken);
    usage_json(b);
    buf_printf(b, ",\"recording\":%s,\"samples_dropped\":%" PRIu64 ",\"samples\":[",
               recording ? "true" : "false", samples_dropped);
    buf_reserve(b, (size_t)n_samples * 12 + 8);
    for (long i = 0; i < n_samples; i++) buf_printf(b, i ? ",%.6f" : "%.6f", samples[i]);
    buf_printf(b, "]}");
    n_samples = 0;
    samples_dropped = 0;
}

static long waiting_first(void) {
    long waiting = 0;
    for (long i = 0; i < opt.n; i++) {
        const struct conn *c = &conns[i];
        if (c->in_load && c->events == 0 && c->state == ST_STREAMING) waiting++;
    }
    return waiting;
}

/* Answer a deferred command once it is due; true if nothing is pending any more. */
static bool settle_pending(struct buf *out) {
    if (pending == P_CONNECT) {
        if (initial_resolved < opt.n && now_mono < pending_until) return false;
        connect_phase = false;
        for (long i = 0; i < opt.n && initial_resolved < opt.n; i++) {
            struct conn *c = &conns[i];
            if (c->in_load || c->state == ST_DEAD) continue;
            if (c->state == ST_IDLE) initial_inflight++; /* never started */
            attempt_failed(c, R_PHASE);
        }
        buf_printf(out, "{\"type\":\"connect\",\"connected\":%ld,\"seconds\":%.3f", in_load_count,
                   now_mono - connect_started);
        reasons_json(out, "failed", failed);
        buf_printf(out, "}");
        emit(out);
    } else if (pending == P_WAIT_FIRST) {
        long waiting = waiting_first();
        if (waiting > 0 && now_mono < pending_until) return false;
        buf_printf(out, "{\"type\":\"wait-first\",\"waiting\":%ld,\"seconds\":%.3f}", waiting,
                   now_mono - pending_started);
        emit(out);
    }
    pending = P_NONE;
    return true;
}

static void stop_all(void) {
    for (long i = 0; i < opt.n; i++) close_fd(&conns[i]);
}

/* --- commands ------------------------------------------------------------------------------ */

static void command(char *line, struct buf *out) {
    char word[32] = "", arg1[64] = "", arg2[64] = "";
    int got = sscanf(line, "%31s %63s %63s", word, arg1, arg2);
    if (got <= 0) return;
    if (strcmp(word, "connect") == 0) {
        if (connect_phase || next_initial > 0) {
            buf_printf(out, "{\"type\":\"error\",\"message\":\"already connected\"}");
            emit(out);
            return;
        }
        double s = got >= 2 ? strtod(arg1, NULL) : 0;
        connect_phase = true;
        connect_started = now_mono;
        pending = P_CONNECT;
        pending_until = s > 0 ? now_mono + s : 1e300;
        start_initial_connects();
        settle_pending(out);
    } else if (strcmp(word, "wait-first") == 0) {
        double s = got >= 2 ? strtod(arg1, NULL) : 10.0;
        pending = P_WAIT_FIRST;
        pending_started = now_mono;
        pending_until = now_mono + (s > 0 ? s : 0);
        settle_pending(out);
    } else if (strcmp(word, "snapshot") == 0) {
        snapshot(out);
        emit(out);
    } else if (strcmp(word, "record") == 0) {
        recording = strcmp(arg1, "on") == 0;
        n_samples = 0;
        samples_dropped = 0;
        buf_printf(out, "{\"type\":\"ok\",\"recording\":%s}", recording ? "true" : "false");
        emit(out);
    } else if (strcmp(word, "churn") == 0) {
        double rate = strtod(arg1, NULL), secs = got >= 3 ? strtod(arg2, NULL) : 0;
        churn_rate = rate > 0 && secs > 0 ? rate : 0;
        churn_until = now_mono + secs;
        churn_next = now_mono;
        churn_carry = 0;
        buf_printf(out, "{\"type\":\"ok\",\"churn\":%.3f}", churn_rate);
        emit(out);
    } else if (strcmp(word, "stop") == 0) {
        stop_all();
        buf_printf(out, "{\"type\":\"stopped\"");
        usage_json(out);
        buf_printf(out, "}");
        emit(out);
        exit(0);
    } else {
        buf_printf(out, "{\"type\":\"error\",\"message\":\"unknown command\"}");
        emit(out);
    }
}

static void on_stdin(void) {
    if (cmdlen >= sizeof cmdbuf - 1) die("commands sent before the previous one was answered");
    ssize_t n = read(STDIN_FILENO, cmdbuf + cmdlen, sizeof cmdbuf - 1 - cmdlen);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) return;
        n = 0;
    }
    if (n == 0) {
        stdin_open = false;
        return;
    }
    cmdlen += (size_t)n;
    if (cmdlen >= sizeof cmdbuf - 1 && memchr(cmdbuf, '\n', cmdlen) == NULL)
        die("command line too long");
}

/* Run the buffered commands, stopping at one whose answer is deferred. */
static void run_commands(struct buf *out) {
    while (pending == P_NONE) {
        char *nl = memchr(cmdbuf, '\n', cmdlen);
        if (nl == NULL) break;
        *nl = '\0';
        char line[CMD_MAX];
        memcpy(line, cmdbuf, (size_t)(nl - cmdbuf) + 1);
        size_t used = (size_t)(nl - cmdbuf) + 1;
        memmove(cmdbuf, cmdbuf + used, cmdlen - used);
        cmdlen -= used;
        command(line, out);
    }
}

/* --- main ---------------------------------------------------------------------------------- */

static double num_arg(const char *name, const char *v, double lo, double hi) {
    char *end;
    double d = strtod(v, &end);
    if (*v == '\0' || *end != '\0' || !(d >= lo && d <= hi))
        die("%s: expected a number in [%g, %g], got %s", name, lo, hi, v);
    return d;
}

static void parse_args(int argc, char **argv) {
    const char *host = "127.0.0.1";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define ARG(name) (strcmp(a, name) == 0 && (v != NULL || (die("%s needs a value", name), 0)) && ++i)
        if (ARG("--host"))
            host = v;
        else if (ARG("--port"))
            opt.port = (int)num_arg(a, v, 1, 65535);
        else if (ARG("--path"))
            opt.path = v;
        else if (ARG("-n"))
            opt.n = (long)num_arg(a, v, 1, MAX_CONNS);
        else if (ARG("--topics"))
            opt.topics = (long)num_arg(a, v, 1, MAX_CONNS);
        else if (ARG("--sample-every"))
            opt.sample_every = (long)num_arg(a, v, 1, 1e9);
        else if (ARG("--seq-from")) {
            if (strcmp(v, "id") != 0 && strcmp(v, "data") != 0) die("--seq-from: data or id");
            opt.seq_from_id = strcmp(v, "id") == 0;
        } else if (ARG("--cycle-delay"))
            opt.cycle_delay = num_arg(a, v, 0, 3600);
        else if (ARG("--parallel"))
            opt.parallel = (long)num_arg(a, v, 1, MAX_CONNS);
        else if (ARG("--connect-timeout"))
            opt.connect_timeout = num_arg(a, v, 0.01, 3600);
        else if (ARG("--max-seconds"))
            opt.max_seconds = num_arg(a, v, 0.1, 86400);
        else if (ARG("--max-samples"))
            opt.max_samples = (long)num_arg(a, v, 0, 1e8);
        else if (strcmp(a, "--no-reconnect") == 0)
            opt.reconnect = false;
        else if (strcmp(a, "--http10") == 0)
            opt.http10 = true;
        else
            die("unknown argument %s (see the comment at the top of bench/sseload.c)", a);
#undef ARG
    }
    if (opt.port == 0 || opt.path == NULL) die("--port and --path are required");
    if (opt.path[0] != '/' || strlen(opt.path) > MAX_PATH_BYTES) die("--path: /...");
    for (const char *p = opt.path; *p; p++)
        if ((unsigned char)*p <= ' ' || *p == 0x7f) die("--path: no spaces or control bytes");
    memset(&target, 0, sizeof target);
    target.sin_family = AF_INET;
    target.sin_port = htons((uint16_t)opt.port);
    if (strcmp(host, "localhost") == 0) host = "127.0.0.1";
    if (inet_pton(AF_INET, host, &target.sin_addr) != 1 ||
        (ntohl(target.sin_addr.s_addr) >> 24) != 127)
        die("--host: only loopback (127.0.0.0/8 or localhost) is allowed, got %s", host);
}

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
        (rlim_t)opt.n + 16 > rl.rlim_cur)
        die("-n %ld does not fit RLIMIT_NOFILE %llu (hard limit reached)", opt.n,
            (unsigned long long)rl.rlim_cur);
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    raise_nofile();
    signal(SIGPIPE, SIG_IGN);
    /* A backstop for the time limit below, should the loop ever block (a stuck stdout). */
    alarm((unsigned)opt.max_seconds + 10);
    conns = calloc((size_t)opt.n, sizeof *conns);
    perm = calloc((size_t)opt.n, sizeof *perm);
    samples = calloc((size_t)(opt.max_samples > 0 ? opt.max_samples : 1), sizeof *samples);
    if (conns == NULL || perm == NULL || samples == NULL) die("out of memory");
    for (long i = 0; i < opt.n; i++) {
        conns[i].fd = -1;
        conns[i].last_seq = -1;
        conns[i].topic = (uint32_t)(i % opt.topics);
        conns[i].state = ST_IDLE;
    }
    countdown = opt.sample_every;
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1: %s", strerror(errno));
    struct epoll_event sev = {.events = EPOLLIN, .data.u32 = STDIN_TAG};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, STDIN_FILENO, &sev) < 0)
        die("stdin must be a pipe or a terminal: %s", strerror(errno));
    struct buf out = {0};
    struct epoll_event evs[MAX_EVENTS];
    started_at = now_mono = mono();

    for (;;) {
        int timeout = 1000;
        if (timed_head != NULL || churn_rate > 0 || pending != P_NONE) timeout = 10;
        int n = epoll_wait(epfd, evs, MAX_EVENTS, timeout);
        if (n < 0 && errno != EINTR) die("epoll_wait: %s", strerror(errno));
        now_mono = mono();
        for (int i = 0; i < n; i++) {
            uint32_t tag = evs[i].data.u32;
            if (tag == STDIN_TAG) {
                on_stdin();
                if (!stdin_open) epoll_ctl(epfd, EPOLL_CTL_DEL, STDIN_FILENO, NULL);
                continue;
            }
            struct conn *c = &conns[tag];
            if (c->fd >= 0) on_socket(c, evs[i].events);
        }
        if (timed_head != NULL) run_timers();
        run_churn();
        if (connect_phase) start_initial_connects();
        if (pending != P_NONE) settle_pending(&out);
        run_commands(&out);
        if (!stdin_open && pending == P_NONE && memchr(cmdbuf, '\n', cmdlen) == NULL) {
            stop_all();
            return 0;
        }
        if (now_mono - started_at > opt.max_seconds) {
            fprintf(stderr, "sseload: --max-seconds %.0f reached, exiting\n", opt.max_seconds);
            stop_all();
            return 3;
        }
    }
}
