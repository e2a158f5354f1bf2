/* The streaming load client of the proxy benchmark (bench/overhead.py).
 *
 *   stream_client --port P --path /v1/chat/completions --body-file F --out F
 *                 [--concurrency 50] [--duration-ms 6000] [--ramp-ms 0]
 *                 [--streams-per-conn 0] [--timeout-ms 60000] [--deadline-ms 180000]
 *
 * Opens --concurrency keep-alive connections to 127.0.0.1:P, connection i starting at
 * i * ramp / concurrency ms, and on each POSTs the body (a chat request with "stream": true)
 * and reads the SSE answer, again and again until --duration-ms after its own start (or
 * --streams-per-conn streams). One thread, epoll, non-blocking sockets, so that it costs far
 * less CPU than what it measures. For every stream it writes one line to --out:
 *
 *   <conn> <start_us> <status> <err> <ttfb_us> <total_us> <content_events> <done> <gaps_us>
 *
 * start_us counts from the client's start; ttfb_us is from the start of the stream (the
 * connect, on a new connection; sending the request, on a kept-alive one) to the arrival of
 * the first body byte of the answer (the first "data:" byte of the first event); total_us is
 * to the end of the answer; gaps_us are the times between consecutive
 * content events (events with "content" in them), comma-separated ("-" if none).
 * err: 0 ok, 1 connect failed, 2 closed or reset before the end of the answer,
 * 3 timed out, 4 could not parse the answer. The answer is complete when done is 1 (it had
 * data: [DONE]) and content_events is what the benchmark expects.
 * --deadline-ms bounds the whole run: streams still open then are recorded as timed out.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { IDLE, CONNECTING, SENDING, HEAD, BODY, FINISHED };
enum { CH_SIZE, CH_EXT, CH_SIZE_LF, CH_DATA, CH_DATA_CR, CH_DATA_LF, CH_TRAILER, CH_DONE };
enum { E_OK, E_CONNECT, E_CLOSED, E_TIMEOUT, E_PARSE };

#define HEAD_MAX 16384
#define EVENT_KEEP 512 /* bytes of an event kept to classify it */

typedef struct {
    int fd;
    int state;
    int index;
    int streams_done;
    uint64_t begin_ns;      /* this connection's first start */
    uint64_t next_ns;       /* when to start the next stream (state IDLE) */
    /* the stream under way */
    uint64_t start_ns, sent_ns, first_ns, last_event_ns;
    size_t sent;
    char head[HEAD_MAX];
    size_t head_len;
    int status, chunked, conn_close;
    long long content_length, body_read;
    int ch_state;
    unsigned long long ch_left;
    char event[EVENT_KEEP];
    size_t event_len;
    int event_lf;           /* the previous body byte was '\n' */
    int content_events, done;
    uint32_t *gaps;
    size_t gaps_len, gaps_cap;
} conn_t;

static conn_t *conns;
static int concurrency = 50;
static uint64_t duration_ns = 6000000000ULL, ramp_ns = 0, timeout_ns = 60000000000ULL;
static uint64_t deadline_ns = 180000000000ULL;
static int per_conn = 0;
static struct sockaddr_in target;
static char *request;
static size_t request_len;
static FILE *out;
static uint64_t t0;
static int epfd;
static int active; /* connections that will start another stream or have one open */

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void record(conn_t *c, int err, uint64_t end) {
    uint64_t from = c->start_ns;
    long long ttfb = c->first_ns ? (long long)(c->first_ns - from) / 1000 : -1;
    fprintf(out, "%d %llu %d %d %lld %llu %d %d ", c->index,
            (unsigned long long)((c->start_ns - t0) / 1000), c->status, err, ttfb,
            (unsigned long long)((end - from) / 1000), c->content_events, c->done);
    if (c->gaps_len == 0) {
        fputs("-\n", out);
        return;
    }
    for (size_t i = 0; i < c->gaps_len; i++)
        fprintf(out, i ? ",%u" : "%u", c->gaps[i]);
    fputc('\n', out);
}

static void drop_socket(conn_t *c) {
    if (c->fd >= 0) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = -1;
    }
}

/* The stream ended (well or not): record it, then schedule the next or retire. */
static void end_stream(conn_t *c, int err, uint64_t now) {
    record(c, err, now);
    c->streams_done++;
    if (err != E_OK || c->conn_close) drop_socket(c);
    int more = now < c->begin_ns + duration_ns && now < t0 + deadline_ns &&
               (per_conn == 0 || c->streams_done < per_conn);
    if (more) {
        c->state = IDLE;
        c->next_ns = now;
    } else {
        c->state = FINISHED;
        drop_socket(c);
        active--;
    }
}

static void watch(conn_t *c, int op, uint32_t events) {
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = events;
    ev.data.ptr = c;
    if (epoll_ctl(epfd, op, c->fd, &ev) < 0) die("epoll_ctl");
}

static void try_send(conn_t *c, uint64_t now) {
    while (c->sent < request_len) {
        ssize_t n = send(c->fd, request + c->sent, request_len - c->sent, MSG_NOSIGNAL);
        if (n > 0) {
            c->sent += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            watch(c, EPOLL_CTL_MOD, EPOLLIN | EPOLLOUT);
            return;
        } else {
            end_stream(c, E_CLOSED, now);
            return;
        }
    }
    c->sent_ns = now_ns();
    c->state = HEAD;
    watch(c, EPOLL_CTL_MOD, EPOLLIN | EPOLLRDHUP);
}

static void start_stream(conn_t *c, uint64_t now) {
    c->start_ns = now;
    c->sent_ns = c->first_ns = c->last_event_ns = 0;
    c->sent = c->head_len = 0;
    c->status = c->chunked = c->conn_close = 0;
    c->content_length = -1;
    c->body_read = 0;
    c->ch_state = CH_SIZE;
    c->ch_left = 0;
    c->event_len = 0;
    c->event_lf = 0;
    c->content_events = c->done = 0;
    c->gaps_len = 0;
    if (c->fd >= 0) {
        c->state = SENDING;
        try_send(c, now);
        return;
    }
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        end_stream(c, E_CONNECT, now);
        return;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int rc = connect(c->fd, (struct sockaddr *)&target, sizeof target);
    if (rc == 0) {
        watch(c, EPOLL_CTL_ADD, EPOLLIN | EPOLLRDHUP);
        c->state = SENDING;
        try_send(c, now);
    } else if (errno == EINPROGRESS) {
        c->state = CONNECTING;
        watch(c, EPOLL_CTL_ADD, EPOLLOUT);
    } else {
        end_stream(c, E_CONNECT, now);
    }
}

static void add_gap(conn_t *c, uint64_t gap_ns) {
    if (c->gaps_len == c->gaps_cap) {
        c->gaps_cap = c->gaps_cap ? c->gaps_cap * 2 : 64;
        c->gaps = realloc(c->gaps, c->gaps_cap * sizeof *c->gaps);
        if (c->gaps == NULL) die("realloc");
    }
    uint64_t us = gap_ns / 1000;
    c->gaps[c->gaps_len++] = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
}

/* An SSE event ended (a blank line): classify it by its first bytes. */
static void event_done(conn_t *c, uint64_t now) {
    if (c->event_len == 0) return;
    const char *e = c->event;
    size_t n = c->event_len;
    if (n >= 12 && memcmp(e, "data: [DONE]", 12) == 0) {
        c->done = 1;
    } else if (memmem(e, n, "\"content\"", 9) != NULL) {
        if (c->last_event_ns) add_gap(c, now - c->last_event_ns);
        c->last_event_ns = now;
        c->content_events++;
    }
    c->event_len = 0;
}

/* Body bytes (chunked encoding already removed): split into SSE events. */
static void body_bytes(conn_t *c, const char *p, size_t n, uint64_t now) {
    if (n > 0 && c->first_ns == 0) c->first_ns = now;
    for (size_t i = 0; i < n; i++) {
        char ch = p[i];
        if (ch == '\r') continue;
        if (ch == '\n') {
            if (c->event_lf) {
                event_done(c, now);
                c->event_lf = 0;
                continue;
            }
            c->event_lf = 1;
        } else {
            c->event_lf = 0;
        }
        if (c->event_len < EVENT_KEEP) c->event[c->event_len++] = ch;
    }
}

/* Decode chunked transfer encoding; returns 1 when the answer is complete, -1 on error. */
static int chunked_bytes(conn_t *c, const char *p, size_t n, uint64_t now) {
    size_t i = 0;
    while (i < n) {
        char ch = p[i];
        switch (c->ch_state) {
        case CH_SIZE:
            if ((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f') || (ch >= 'A' && ch <= 'F')) {
                int d = ch <= '9' ? ch - '0' : (ch | 0x20) - 'a' + 10;
                c->ch_left = c->ch_left * 16 + (unsigned)d;
                if (c->ch_left > (1ULL << 40)) return -1;
            } else if (ch == ';' || ch == ' ') {
                c->ch_state = CH_EXT;
            } else if (ch == '\r') {
                c->ch_state = CH_SIZE_LF;
            } else {
                return -1;
            }
            i++;
            break;
        case CH_EXT:
            if (ch == '\r') c->ch_state = CH_SIZE_LF;
            i++;
            break;
        case CH_SIZE_LF:
            if (ch != '\n') return -1;
            i++;
            c->ch_state = c->ch_left ? CH_DATA : CH_TRAILER;
            if (c->ch_state == CH_TRAILER) c->head_len = 0; /* reuse as a line counter */
            break;
        case CH_DATA: {
            size_t take = n - i < c->ch_left ? n - i : (size_t)c->ch_left;
            body_bytes(c, p + i, take, now);
            i += take;
            c->ch_left -= take;
            if (c->ch_left == 0) c->ch_state = CH_DATA_CR;
            break;
        }
        case CH_DATA_CR:
            if (ch != '\r') return -1;
            c->ch_state = CH_DATA_LF;
            i++;
            break;
        case CH_DATA_LF:
            if (ch != '\n') return -1;
            c->ch_state = CH_SIZE;
            c->ch_left = 0;
            i++;
            break;
        case CH_TRAILER:
            /* Trailer lines until an empty one: head_len counts the current line's bytes. */
            if (ch == '\n') {
                if (c->head_len == 0) {
                    c->ch_state = CH_DONE;
                    return i + 1 == n ? 1 : -1; /* nothing may follow before the next request */
                }
                c->head_len = 0;
            } else if (ch != '\r') {
                c->head_len++;
            }
            i++;
            break;
        default:
            return -1;
        }
    }
    return 0;
}

static void parse_head(conn_t *c) {
    /* "HTTP/1.1 200 OK\r\n" */
    c->status = (int)strtol(c->head + 9, NULL, 10);
    char *p = memchr(c->head, '\n', c->head_len);
    while (p != NULL && (size_t)(p - c->head) + 1 < c->head_len) {
        char *line = p + 1;
        char *eol = memchr(line, '\n', c->head_len - (size_t)(line - c->head));
        if (eol == NULL) break;
        size_t len = (size_t)(eol - line);
        if (len > 18 && strncasecmp(line, "transfer-encoding:", 18) == 0 &&
            memmem(line, len, "chunked", 7))
            c->chunked = 1;
        else if (len > 15 && strncasecmp(line, "content-length:", 15) == 0)
            c->content_length = strtoll(line + 15, NULL, 10);
        else if (len > 11 && strncasecmp(line, "connection:", 11) == 0 &&
                 (memmem(line, len, "close", 5) || memmem(line, len, "Close", 5)))
            c->conn_close = 1;
        p = eol;
    }
}

static void on_readable(conn_t *c, uint64_t now) {
    char buf[65536];
    for (;;) {
        ssize_t n = recv(c->fd, buf, sizeof buf, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        if (n <= 0) {
            /* Closed: the end of an answer without length, else a broken one. */
            int complete = c->state == BODY && !c->chunked && c->content_length < 0;
            c->conn_close = 1;
            end_stream(c, complete ? E_OK : E_CLOSED, now);
            return;
        }
        const char *p = buf;
        size_t len = (size_t)n;
        if (c->state == HEAD) {
            size_t room = HEAD_MAX - c->head_len;
            size_t take = len < room ? len : room;
            memcpy(c->head + c->head_len, p, take);
            size_t old = c->head_len;
            c->head_len += take;
            char *end = memmem(c->head, c->head_len, "\r\n\r\n", 4);
            if (end == NULL) {
                if (c->head_len == HEAD_MAX) {
                    end_stream(c, E_PARSE, now);
                    return;
                }
                continue;
            }
            size_t head_end = (size_t)(end - c->head) + 4;
            c->head_len = head_end;
            parse_head(c);
            c->head_len = 0;
            p += head_end - old;
            len -= head_end - old;
            c->state = BODY;
            if (!c->chunked && c->content_length == 0) {
                end_stream(c, E_OK, now);
                return;
            }
        }
        if (c->state != BODY) return;
        if (c->chunked) {
            int r = chunked_bytes(c, p, len, now);
            if (r != 0) {
                end_stream(c, r > 0 ? E_OK : E_PARSE, now);
                return;
            }
        } else {
            body_bytes(c, p, len, now);
            c->body_read += (long long)len;
            if (c->content_length >= 0 && c->body_read >= c->content_length) {
                event_done(c, now);
                end_stream(c, c->body_read == c->content_length ? E_OK : E_PARSE, now);
                return;
            }
        }
    }
}

static void on_event(conn_t *c, uint32_t events, uint64_t now) {
    if (c->state == CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err != 0 || (events & (EPOLLERR | EPOLLHUP))) {
            end_stream(c, E_CONNECT, now);
            return;
        }
        c->state = SENDING;
        try_send(c, now);
        return;
    }
    if (c->state == SENDING) {
        if (events & (EPOLLERR | EPOLLHUP)) {
            end_stream(c, E_CLOSED, now);
            return;
        }
        if (events & EPOLLOUT) try_send(c, now);
        if (c->state != HEAD) return;
    }
    if (c->state == HEAD || c->state == BODY) on_readable(c, now);
    else if (c->state == IDLE && c->fd >= 0) {
        /* The server closed an idle keep-alive connection: reconnect for the next one. */
        char b;
        if (recv(c->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT) <= 0) drop_socket(c);
    }
}

static long long arg_num(const char *value, const char *name) {
    char *end;
    long long v = strtoll(value, &end, 10);
    if (*value == '\0' || *end != '\0' || v < 0) {
        fprintf(stderr, "bad %s: %s\n", name, value);
        exit(2);
    }
    return v;
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) die(path);
    char *data = malloc(1 << 20);
    if (data == NULL) die("malloc");
    *len = fread(data, 1, (1 << 20) - 1, f);
    fclose(f);
    return data;
}

int main(int argc, char **argv) {
    int port = 0;
    const char *path = "/v1/chat/completions", *body_file = NULL, *out_file = NULL;
    for (int i = 1; i < argc; i += 2) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (v == NULL) {
            fprintf(stderr, "%s needs a value\n", a);
            return 2;
        }
        if (strcmp(a, "--port") == 0) port = (int)arg_num(v, a);
        else if (strcmp(a, "--path") == 0) path = v;
        else if (strcmp(a, "--body-file") == 0) body_file = v;
        else if (strcmp(a, "--out") == 0) out_file = v;
        else if (strcmp(a, "--concurrency") == 0) concurrency = (int)arg_num(v, a);
        else if (strcmp(a, "--duration-ms") == 0) duration_ns = (uint64_t)arg_num(v, a) * 1000000ULL;
        else if (strcmp(a, "--ramp-ms") == 0) ramp_ns = (uint64_t)arg_num(v, a) * 1000000ULL;
        else if (strcmp(a, "--streams-per-conn") == 0) per_conn = (int)arg_num(v, a);
        else if (strcmp(a, "--timeout-ms") == 0) timeout_ns = (uint64_t)arg_num(v, a) * 1000000ULL;
        else if (strcmp(a, "--deadline-ms") == 0) deadline_ns = (uint64_t)arg_num(v, a) * 1000000ULL;
        else {
            fprintf(stderr, "unknown option %s\n", a);
            return 2;
        }
    }
    if (port == 0 || body_file == NULL || out_file == NULL || concurrency < 1) {
        fprintf(stderr, "usage: stream_client --port P --body-file F --out F [options]\n");
        return 2;
    }
    size_t body_len;
    char *body = read_file(body_file, &body_len);
    request = malloc(body_len + 1024);
    if (request == NULL) die("malloc");
    request_len = (size_t)sprintf(request,
        "POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
        "Accept: text/event-stream\r\nContent-Length: %zu\r\n\r\n", path, port, body_len);
    memcpy(request + request_len, body, body_len);
    request_len += body_len;

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGPIPE, SIG_IGN);
    out = fopen(out_file, "w");
    if (out == NULL) die(out_file);
    setvbuf(out, NULL, _IOFBF, 1 << 20);

    memset(&target, 0, sizeof target);
    target.sin_family = AF_INET;
    target.sin_port = htons((uint16_t)port);
    target.sin_addr.s_addr = htonl(INADDR_LOOPBACK);

    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");
    conns = calloc((size_t)concurrency, sizeof *conns);
    if (conns == NULL) die("calloc");
    t0 = now_ns();
    for (int i = 0; i < concurrency; i++) {
        conn_t *c = &conns[i];
        c->fd = -1;
        c->index = i;
        c->state = IDLE;
        c->begin_ns = t0 + ramp_ns * (uint64_t)i / (uint64_t)concurrency;
        c->next_ns = c->begin_ns;
    }
    active = concurrency;

    struct epoll_event events[1024];
    while (active > 0) {
        uint64_t now = now_ns();
        /* Start what is due, time out what is stuck, and find the next wake-up. */
        uint64_t wake = now + 100000000ULL; /* at least every 100 ms */
        for (int i = 0; i < concurrency; i++) {
            conn_t *c = &conns[i];
            if (c->state == IDLE) {
                if (c->next_ns <= now) start_stream(c, now);
                else if (c->next_ns < wake) wake = c->next_ns;
            } else if (c->state != FINISHED) {
                if (now - c->start_ns > timeout_ns || now > t0 + deadline_ns)
                    end_stream(c, E_TIMEOUT, now);
            }
        }
        if (active == 0) break;
        now = now_ns();
        int ms = wake > now ? (int)((wake - now + 999999) / 1000000) : 0;
        int n = epoll_wait(epfd, events, 1024, ms);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        now = now_ns();
        for (int i = 0; i < n; i++) on_event(events[i].data.ptr, events[i].events, now);
    }
    fclose(out);
    free(body);
    return 0;
}
