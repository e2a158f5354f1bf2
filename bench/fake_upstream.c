/* A fast, llama.cpp-shaped fake upstream for the proxy benchmark (bench/overhead.py).
 *
 *   fake_upstream --port P [--tokens 32] [--interval-ms 20] [--first-token-ms 20]
 *                 [--plain-delay-ms 0]
 *
 * One thread, epoll, one timerfd for every stream: a min-heap of due times, so each timer
 * tick sends the token events of all the streams that are due. HTTP/1.1 with keep-alive,
 * just enough parsing for the proxy, nginx and the load clients: request line, headers up
 * to CRLF CRLF, a Content-Length body. Answers:
 *
 *   GET  /health      200 {"status":"ok"}
 *   GET  /v1/models   one model, "fake-model"
 *   GET  /props       total_slots 100000, model_path /m/fake-model.gguf, n_ctx 4096
 *   GET  /slots       []
 *   POST (any path)   an OpenAI chat answer: with "stream": true in the body, SSE
 *                     (Transfer-Encoding: chunked, one HTTP chunk per event): a token event
 *                     every interval (the first after first-token-ms), then a final event
 *                     with finish_reason "stop", usage and timings, then data: [DONE];
 *                     otherwise a chat.completion JSON (Content-Length) after
 *                     plain-delay-ms (default 0: at once).
 *
 * Every event is prebuilt at start-up, so a tick costs one write() per due stream.
 * SIGTERM or SIGINT stops it; it prints "ready <port>" on stdout once it listens.
 */
#define _GNU_SOURCE
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
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_REQUEST (1 << 20) /* headers + body of one request */
#define READ_CHUNK 65536

typedef struct {
    const char *data;
    size_t len;
} bytes_t;

typedef struct {
    int open;
    uint32_t gen;         /* bumped on close: heap entries of an older gen are stale */
    char *in;             /* received, not yet handled */
    size_t in_len, in_cap;
    char *out;            /* to send once the socket is writable again */
    size_t out_len, out_off, out_cap;
    int busy;             /* 1: a stream or a delayed answer is under way */
    int streaming;
    int sent;             /* token events sent */
    uint64_t start_ns;    /* when the request was read */
    int close_after;      /* "Connection: close" */
    int want_out;         /* EPOLLOUT registered */
} conn_t;

typedef struct {
    uint64_t due;
    int fd;
    uint32_t gen;
} entry_t;

static conn_t *conns;
static int max_fds;
static entry_t *heap;
static size_t heap_len, heap_cap;
static int epfd, tfd;
static uint64_t armed_for; /* due time the timer is set to, 0 = disarmed */

static int n_tokens = 32;
static uint64_t interval_ns = 20000000ULL;
static uint64_t first_ns = 20000000ULL;
static uint64_t plain_ns = 0;

static bytes_t stream_head, token_event, final_events, plain_answer;
static bytes_t health_answer, models_answer, props_answer, slots_answer, notfound_answer;
static bytes_t bad_request_answer;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n);
    if (q == NULL) die("realloc");
    return q;
}

/* ---- prebuilt answers ---------------------------------------------------------------- */

static bytes_t own(char *s, size_t n) {
    bytes_t b = {s, n};
    return b;
}

static bytes_t json_answer(int status, const char *reason, const char *body) {
    size_t cap = strlen(body) + 256;
    char *s = xrealloc(NULL, cap);
    int n = snprintf(s, cap,
                     "HTTP/1.1 %d %s\r\nServer: llama.cpp\r\nContent-Type: application/json; "
                     "charset=utf-8\r\nContent-Length: %zu\r\n\r\n%s",
                     status, reason, strlen(body), body);
    return own(s, (size_t)n);
}

/* One SSE event as one HTTP chunk: "<hex len>\r\ndata: <json>\n\n\r\n". */
static size_t put_chunk(char *dst, const char *payload) {
    size_t len = strlen(payload);
    int n = sprintf(dst, "%zx\r\n", len);
    memcpy(dst + n, payload, len);
    memcpy(dst + n + len, "\r\n", 2);
    return (size_t)n + len + 2;
}

static void timings_json(char *dst, size_t cap) {
    double interval_ms = (double)interval_ns / 1e6;
    double per_second = interval_ms > 0 ? 1000.0 / interval_ms : 0.0;
    snprintf(dst, cap,
             "\"usage\":{\"completion_tokens\":%d,\"prompt_tokens\":8,\"total_tokens\":%d},"
             "\"timings\":{\"cache_n\":0,\"prompt_n\":8,\"prompt_ms\":%.3f,"
             "\"prompt_per_token_ms\":%.3f,\"prompt_per_second\":%.3f,\"predicted_n\":%d,"
             "\"predicted_ms\":%.3f,\"predicted_per_token_ms\":%.3f,"
             "\"predicted_per_second\":%.3f}",
             n_tokens, n_tokens + 8, (double)first_ns / 1e6, (double)first_ns / 8e6,
             first_ns ? 8e9 / (double)first_ns : 0.0, n_tokens, interval_ms * n_tokens,
             interval_ms, per_second);
}

static void build_answers(void) {
    char timings[1024];
    timings_json(timings, sizeof timings);

    const char *head = "HTTP/1.1 200 OK\r\nServer: llama.cpp\r\nContent-Type: text/event-stream"
                       "\r\nTransfer-Encoding: chunked\r\n\r\n";
    stream_head = own(strdup(head), strlen(head));

    char *tok = xrealloc(NULL, 512);
    token_event = own(tok, put_chunk(tok,
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok\"},"
        "\"finish_reason\":null}],\"object\":\"chat.completion.chunk\","
        "\"id\":\"chatcmpl-bench\",\"model\":\"fake-model\",\"created\":1}\n\n"));

    char payload[2048];
    char *fin = xrealloc(NULL, 4096);
    snprintf(payload, sizeof payload,
             "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],"
             "\"object\":\"chat.completion.chunk\",\"id\":\"chatcmpl-bench\","
             "\"model\":\"fake-model\",\"created\":1,%s}\n\n", timings);
    size_t n = put_chunk(fin, payload);
    n += put_chunk(fin + n, "data: [DONE]\n\n");
    memcpy(fin + n, "0\r\n\r\n", 5);
    final_events = own(fin, n + 5);

    size_t content_cap = (size_t)n_tokens * 4 + 1;
    char *content = xrealloc(NULL, content_cap);
    content[0] = '\0';
    for (int i = 0; i < n_tokens; i++) strcat(content, "tok");
    size_t body_cap = content_cap + 2048;
    char *body = xrealloc(NULL, body_cap);
    snprintf(body, body_cap,
             "{\"choices\":[{\"finish_reason\":\"stop\",\"index\":0,\"message\":{\"role\":"
             "\"assistant\",\"content\":\"%s\"}}],\"created\":1,\"model\":\"fake-model\","
             "\"system_fingerprint\":\"b-bench\",\"object\":\"chat.completion\","
             "\"id\":\"chatcmpl-bench\",%s}", content, timings);
    plain_answer = json_answer(200, "OK", body);
    free(body);
    free(content);

    health_answer = json_answer(200, "OK", "{\"status\":\"ok\"}");
    models_answer = json_answer(200, "OK",
        "{\"object\":\"list\",\"data\":[{\"id\":\"fake-model\",\"object\":\"model\","
        "\"created\":1,\"owned_by\":\"llamacpp\"}]}");
    props_answer = json_answer(200, "OK",
        "{\"total_slots\":100000,\"model_path\":\"/m/fake-model.gguf\","
        "\"default_generation_settings\":{\"n_ctx\":4096}}");
    slots_answer = json_answer(200, "OK", "[]");
    notfound_answer = json_answer(404, "Not Found",
        "{\"error\":{\"code\":404,\"message\":\"File Not Found\",\"type\":\"not_found_error\"}}");
    bad_request_answer = json_answer(400, "Bad Request",
        "{\"error\":{\"code\":400,\"message\":\"bad request\",\"type\":\"invalid_request_error\"}}");
}

/* ---- the timer heap ------------------------------------------------------------------ */

static void heap_push(uint64_t due, int fd, uint32_t gen) {
    if (heap_len == heap_cap) {
        heap_cap = heap_cap ? heap_cap * 2 : 1024;
        heap = xrealloc(heap, heap_cap * sizeof *heap);
    }
    size_t i = heap_len++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (heap[parent].due <= due) break;
        heap[i] = heap[parent];
        i = parent;
    }
    heap[i].due = due;
    heap[i].fd = fd;
    heap[i].gen = gen;
}

static entry_t heap_pop(void) {
    entry_t top = heap[0];
    entry_t last = heap[--heap_len];
    size_t i = 0;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= heap_len) break;
        if (child + 1 < heap_len && heap[child + 1].due < heap[child].due) child++;
        if (heap[child].due >= last.due) break;
        heap[i] = heap[child];
        i = child;
    }
    if (heap_len > 0) heap[i] = last;
    return top;
}

static void arm_timer(void) {
    uint64_t due = heap_len ? heap[0].due : 0;
    if (due == armed_for) return;
    struct itimerspec spec;
    memset(&spec, 0, sizeof spec);
    if (due) {
        spec.it_value.tv_sec = (time_t)(due / 1000000000ULL);
        spec.it_value.tv_nsec = (long)(due % 1000000000ULL);
    }
    if (timerfd_settime(tfd, TFD_TIMER_ABSTIME, &spec, NULL) < 0) die("timerfd_settime");
    armed_for = due;
}

/* ---- connections --------------------------------------------------------------------- */

static void close_conn(int fd) {
    conn_t *c = &conns[fd];
    if (!c->open) return;
    epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    c->open = 0;
    c->gen++;
    c->in_len = c->out_len = c->out_off = 0;
    c->busy = c->streaming = c->want_out = 0;
}

static void set_want_out(int fd, int want) {
    conn_t *c = &conns[fd];
    if (c->want_out == want) return;
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN | EPOLLRDHUP | (want ? EPOLLOUT : 0);
    ev.data.fd = fd;
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev) < 0) die("epoll_ctl mod");
    c->want_out = want;
}

/* Queue bytes: straight to the socket when nothing is pending, else behind what is. */
static int send_bytes(int fd, const char *data, size_t len) {
    conn_t *c = &conns[fd];
    if (c->out_len == c->out_off) {
        c->out_len = c->out_off = 0;
        while (len > 0) {
            ssize_t n = write(fd, data, len);
            if (n > 0) {
                data += n;
                len -= (size_t)n;
            } else if (n < 0 && errno == EINTR) {
                continue;
            } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                break;
            } else {
                close_conn(fd);
                return -1;
            }
        }
        if (len == 0) return 0;
    }
    if (c->out_len + len > c->out_cap) {
        c->out_cap = (c->out_len + len) * 2;
        c->out = xrealloc(c->out, c->out_cap);
    }
    memcpy(c->out + c->out_len, data, len);
    c->out_len += len;
    set_want_out(fd, 1);
    return 0;
}

static void flush_out(int fd) {
    conn_t *c = &conns[fd];
    while (c->out_off < c->out_len) {
        ssize_t n = write(fd, c->out + c->out_off, c->out_len - c->out_off);
        if (n > 0) {
            c->out_off += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return;
        } else {
            close_conn(fd);
            return;
        }
    }
    c->out_len = c->out_off = 0;
    set_want_out(fd, 0);
}

static int header_is(const char *line, size_t len, const char *name) {
    size_t n = strlen(name);
    return len > n && strncasecmp(line, name, n) == 0 && line[n] == ':';
}

static int has_stream_true(const char *body, size_t len) {
    static const char key[] = "\"stream\"";
    const char *end = body + len;
    for (const char *p = body; p && p + sizeof key - 1 <= end;) {
        p = memmem(p, (size_t)(end - p), key, sizeof key - 1);
        if (p == NULL) return 0;
        p += sizeof key - 1;
        while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
        if (p < end && *p == ':') {
            p++;
            while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
            if (end - p >= 4 && memcmp(p, "true", 4) == 0) return 1;
        }
    }
    return 0;
}

static void finish_request(int fd);

/* Handle every complete request in the input buffer, unless one is under way. */
static void handle_input(int fd) {
    conn_t *c = &conns[fd];
    while (c->open && !c->busy && c->in_len > 0) {
        char *end = memmem(c->in, c->in_len, "\r\n\r\n", 4);
        if (end == NULL) {
            if (c->in_len > MAX_REQUEST) close_conn(fd);
            return;
        }
        size_t head_len = (size_t)(end - c->in) + 4;
        const char *line_end = memmem(c->in, head_len, "\r\n", 2);
        const char *sp1 = memchr(c->in, ' ', (size_t)(line_end - c->in));
        const char *sp2 = sp1 ? memchr(sp1 + 1, ' ', (size_t)(line_end - sp1 - 1)) : NULL;
        if (sp2 == NULL) {
            send_bytes(fd, bad_request_answer.data, bad_request_answer.len);
            close_conn(fd);
            return;
        }
        size_t content_length = 0;
        int chunked = 0;
        c->close_after = 0;
        for (const char *p = line_end + 2; p < end;) {
            const char *eol = memmem(p, (size_t)(end + 2 - p), "\r\n", 2);
            size_t len = (size_t)(eol - p);
            if (header_is(p, len, "content-length")) {
                content_length = strtoul(memchr(p, ':', len) + 1, NULL, 10);
            } else if (header_is(p, len, "transfer-encoding")) {
                chunked = 1;
            } else if (header_is(p, len, "connection")) {
                const char *v = memchr(p, ':', len) + 1;
                if (memmem(v, (size_t)(eol - v), "close", 5) ||
                    memmem(v, (size_t)(eol - v), "Close", 5)) c->close_after = 1;
            }
            p = eol + 2;
        }
        if (chunked || content_length > MAX_REQUEST) {
            send_bytes(fd, bad_request_answer.data, bad_request_answer.len);
            close_conn(fd);
            return;
        }
        if (c->in_len < head_len + content_length) return; /* the body is not all here */
        const char *method = c->in;
        size_t method_len = (size_t)(sp1 - c->in);
        const char *path = sp1 + 1;
        size_t path_len = (size_t)(sp2 - path);
        const char *qs = memchr(path, '?', path_len);
        if (qs) path_len = (size_t)(qs - path);
        const char *body = c->in + head_len;
        int is_post = method_len == 4 && memcmp(method, "POST", 4) == 0;
        int streamed = is_post && has_stream_true(body, content_length);
        const bytes_t *answer = NULL;
#define PATH_IS(s) (path_len == sizeof(s) - 1 && memcmp(path, s, path_len) == 0)
        if (!is_post) {
            if (PATH_IS("/health")) answer = &health_answer;
            else if (PATH_IS("/v1/models") || PATH_IS("/models")) answer = &models_answer;
            else if (PATH_IS("/props")) answer = &props_answer;
            else if (PATH_IS("/slots")) answer = &slots_answer;
            else answer = &notfound_answer;
        }
#undef PATH_IS
        /* Drop the request from the buffer (before sending: a send may close the conn). */
        size_t used = head_len + content_length;
        memmove(c->in, c->in + used, c->in_len - used);
        c->in_len -= used;
        c->start_ns = now_ns();
        if (answer != NULL) {
            if (send_bytes(fd, answer->data, answer->len) < 0) return;
            if (c->close_after) close_conn(fd);
        } else if (streamed) {
            c->busy = c->streaming = 1;
            c->sent = 0;
            if (send_bytes(fd, stream_head.data, stream_head.len) < 0) return;
            heap_push(c->start_ns + first_ns, fd, c->gen);
        } else if (plain_ns > 0) {
            c->busy = 1;
            c->streaming = 0;
            heap_push(c->start_ns + plain_ns, fd, c->gen);
        } else {
            if (send_bytes(fd, plain_answer.data, plain_answer.len) < 0) return;
            if (c->close_after) close_conn(fd);
        }
    }
}

static void finish_request(int fd) {
    conn_t *c = &conns[fd];
    c->busy = c->streaming = 0;
    if (c->close_after) {
        close_conn(fd);
        return;
    }
    handle_input(fd);
}

/* Send what is due: the next token of each due stream, or a delayed plain answer. */
static void run_due(void) {
    uint64_t now = now_ns();
    while (heap_len > 0 && heap[0].due <= now) {
        entry_t e = heap_pop();
        conn_t *c = &conns[e.fd];
        if (!c->open || c->gen != e.gen || !c->busy) continue;
        if (!c->streaming) {
            if (send_bytes(e.fd, plain_answer.data, plain_answer.len) == 0) finish_request(e.fd);
            continue;
        }
        c->sent++;
        if (c->sent < n_tokens) {
            if (send_bytes(e.fd, token_event.data, token_event.len) < 0) continue;
            heap_push(e.due + interval_ns, e.fd, e.gen);
        } else {
            /* The last token, then the final event, [DONE] and the last chunk: one write. */
            char buf[8192];
            size_t n = 0;
            if (n_tokens > 0) {
                memcpy(buf, token_event.data, token_event.len);
                n = token_event.len;
            }
            memcpy(buf + n, final_events.data, final_events.len);
            if (send_bytes(e.fd, buf, n + final_events.len) == 0) finish_request(e.fd);
        }
    }
    arm_timer();
}

static void read_conn(int fd) {
    conn_t *c = &conns[fd];
    for (;;) {
        if (c->in_cap - c->in_len < READ_CHUNK) {
            c->in_cap = c->in_len + READ_CHUNK * 2;
            c->in = xrealloc(c->in, c->in_cap);
        }
        ssize_t n = read(fd, c->in + c->in_len, c->in_cap - c->in_len);
        if (n > 0) {
            c->in_len += (size_t)n;
            if (c->in_len > 2 * MAX_REQUEST) {
                close_conn(fd);
                return;
            }
            continue;
        }
        if (n == 0) { /* the peer closed: drop it, streams included */
            close_conn(fd);
            return;
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        close_conn(fd);
        return;
    }
    handle_input(fd);
}

static void accept_all(int lfd) {
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            return; /* EAGAIN, or out of descriptors: try again on the next wake-up */
        }
        if (fd >= max_fds) {
            close(fd);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        conn_t *c = &conns[fd];
        c->open = 1;
        c->in_len = c->out_len = c->out_off = 0;
        c->busy = c->streaming = c->want_out = c->close_after = 0;
        struct epoll_event ev;
        memset(&ev, 0, sizeof ev);
        ev.events = EPOLLIN | EPOLLRDHUP;
        ev.data.fd = fd;
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl add");
    }
}

static long arg_long(const char *value, const char *name) {
    char *end;
    long v = strtol(value, &end, 10);
    if (*value == '\0' || *end != '\0' || v < 0) {
        fprintf(stderr, "bad %s: %s\n", name, value);
        exit(2);
    }
    return v;
}

int main(int argc, char **argv) {
    int port = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (v == NULL) {
            fprintf(stderr, "%s needs a value\n", a);
            return 2;
        }
        if (strcmp(a, "--port") == 0) port = (int)arg_long(v, a);
        else if (strcmp(a, "--tokens") == 0) n_tokens = (int)arg_long(v, a);
        else if (strcmp(a, "--interval-ms") == 0) interval_ns = (uint64_t)arg_long(v, a) * 1000000ULL;
        else if (strcmp(a, "--first-token-ms") == 0) first_ns = (uint64_t)arg_long(v, a) * 1000000ULL;
        else if (strcmp(a, "--plain-delay-ms") == 0) plain_ns = (uint64_t)arg_long(v, a) * 1000000ULL;
        else {
            fprintf(stderr, "unknown option %s\n", a);
            return 2;
        }
        i++;
    }
    if (n_tokens < 1 || n_tokens > 100000) {
        fprintf(stderr, "--tokens must be 1..100000\n");
        return 2;
    }
    build_answers();

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        getrlimit(RLIMIT_NOFILE, &rl);
    }
    max_fds = rl.rlim_cur > 1000000 ? 1000000 : (int)rl.rlim_cur;
    conns = calloc((size_t)max_fds, sizeof *conns);
    if (conns == NULL) die("calloc");

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0) die("socket");
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons((uint16_t)port);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    if (listen(lfd, 4096) < 0) die("listen");
    socklen_t alen = sizeof addr;
    getsockname(lfd, (struct sockaddr *)&addr, &alen);

    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    signal(SIGPIPE, SIG_IGN);
    int sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sfd < 0) die("signalfd");

    epfd = epoll_create1(EPOLL_CLOEXEC);
    tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (epfd < 0 || tfd < 0) die("epoll/timerfd");
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN;
    ev.data.fd = lfd;
    epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev);
    ev.data.fd = tfd;
    epoll_ctl(epfd, EPOLL_CTL_ADD, tfd, &ev);
    ev.data.fd = sfd;
    epoll_ctl(epfd, EPOLL_CTL_ADD, sfd, &ev);

    printf("ready %d\n", ntohs(addr.sin_port));
    fflush(stdout);

    struct epoll_event events[1024];
    for (;;) {
        int n = epoll_wait(epfd, events, 1024, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            uint32_t e = events[i].events;
            if (fd == lfd) {
                accept_all(lfd);
            } else if (fd == tfd) {
                uint64_t expirations;
                while (read(tfd, &expirations, sizeof expirations) > 0) {}
                armed_for = 0; /* a one-shot timer that fired is disarmed */
            } else if (fd == sfd) {
                return 0;
            } else {
                if (!conns[fd].open) continue;
                if (e & EPOLLOUT) flush_out(fd);
                if (conns[fd].open && (e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)))
                    read_conn(fd);
            }
        }
        run_due();
    }
}
