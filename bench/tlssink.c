/* tlssink: a fast SMTP sink with STARTTLS, for the delivery benchmark (not a test).
 *
 *   tlssink ADDR PORT CERT.pem KEY.pem
 *
 * Accepts every message and throws it away. One thread per connection, blocking I/O,
 * OpenSSL for STARTTLS (TLS 1.2+, server session cache and tickets on, so clients can
 * resume). Offers PIPELINING: replies are buffered and written when the input buffer
 * runs dry, as Postfix's smtpd does. Plaintext buffered behind STARTTLS closes the
 * connection (no injection). Prints "ready PORT" on stdout once listening (PORT 0 =
 * any free port).
 *
 * "XSTAT" (any time, plaintext or TLS) answers
 *   250 msgs=N conns=N tls=N resumed=N tls13=N
 * and is how bench/delivery_bench.py watches progress; it is not counted as a connection.
 *
 * Build: cc -O2 -o tlssink tlssink.c -lssl -lcrypto -lpthread
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

static SSL_CTX *ctx;
static long n_msgs, n_conns, n_tls, n_resumed, n_tls13;

struct conn {
    int fd;
    SSL *ssl;
    char in[16384];
    size_t ipos, ilen;
    char out[4096];
    size_t olen;
    int counted;
};

static int raw_write(struct conn *c, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = c->ssl ? SSL_write(c->ssl, p, (int)n) : write(c->fd, p, n);
        if (w <= 0) {
            if (!c->ssl && w < 0 && errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int flush_out(struct conn *c) {
    int r = c->olen ? raw_write(c, c->out, c->olen) : 0;
    c->olen = 0;
    return r;
}

static int reply(struct conn *c, const char *s) {
    size_t n = strlen(s);
    if (c->olen + n > sizeof c->out && flush_out(c) < 0) return -1;
    memcpy(c->out + c->olen, s, n);
    c->olen += n;
    return 0;
}

static int fill(struct conn *c) {
    if (flush_out(c) < 0) return -1; /* about to block: send what the client waits for */
    if (c->ipos > 0) {
        memmove(c->in, c->in + c->ipos, c->ilen - c->ipos);
        c->ilen -= c->ipos;
        c->ipos = 0;
    }
    if (c->ilen == sizeof c->in) return -1; /* line too long */
    ssize_t r;
    do {
        r = c->ssl ? SSL_read(c->ssl, c->in + c->ilen, (int)(sizeof c->in - c->ilen))
                   : read(c->fd, c->in + c->ilen, sizeof c->in - c->ilen);
    } while (!c->ssl && r < 0 && errno == EINTR);
    if (r <= 0) return -1;
    c->ilen += (size_t)r;
    return 0;
}

/* Next line (without CRLF) into line and len; -1 at EOF or error. */
static int next_line(struct conn *c, char **line, size_t *len) {
    for (;;) {
        char *start = c->in + c->ipos;
        char *nl = memchr(start, '\n', c->ilen - c->ipos);
        if (nl) {
            size_t n = (size_t)(nl - start);
            if (n > 0 && start[n - 1] == '\r') n--;
            *line = start;
            *len = n;
            c->ipos = (size_t)(nl - c->in) + 1;
            return 0;
        }
        if (fill(c) < 0) return -1;
    }
}

static int verb_is(const char *line, size_t len, const char *verb) {
    size_t v = strlen(verb);
    return len >= v && strncasecmp(line, verb, v) == 0 && (len == v || line[v] == ' ');
}

static void *serve(void *arg) {
    struct conn *c = arg;
    char *line;
    size_t len;
    char buf[256];
    reply(c, "220 sink.bench.test ESMTP tlssink\r\n");
    while (next_line(c, &line, &len) == 0) {
        if (verb_is(line, len, "EHLO")) {
            reply(c, "250-sink.bench.test\r\n250-PIPELINING\r\n250-SIZE 104857600\r\n"
                     "250-8BITMIME\r\n250-SMTPUTF8\r\n");
            reply(c, c->ssl ? "250 ENHANCEDSTATUSCODES\r\n"
                            : "250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n");
        } else if (verb_is(line, len, "HELO")) {
            reply(c, "250 sink.bench.test\r\n");
        } else if (verb_is(line, len, "STARTTLS") && !c->ssl) {
            if (c->ipos != c->ilen) break; /* plaintext behind STARTTLS: refuse */
            reply(c, "220 2.0.0 Ready to start TLS\r\n");
            if (flush_out(c) < 0) break;
            c->ssl = SSL_new(ctx);
            SSL_set_fd(c->ssl, c->fd);
            if (SSL_accept(c->ssl) != 1) break;
            __atomic_fetch_add(&n_tls, 1, __ATOMIC_RELAXED);
            if (SSL_session_reused(c->ssl)) __atomic_fetch_add(&n_resumed, 1, __ATOMIC_RELAXED);
            if (SSL_version(c->ssl) == TLS1_3_VERSION)
                __atomic_fetch_add(&n_tls13, 1, __ATOMIC_RELAXED);
        } else if (verb_is(line, len, "MAIL")) {
            if (!c->counted) {
                c->counted = 1;
                __atomic_fetch_add(&n_conns, 1, __ATOMIC_RELAXED);
            }
            reply(c, "250 2.1.0 Ok\r\n");
        } else if (verb_is(line, len, "RCPT")) {
            reply(c, "250 2.1.5 Ok\r\n");
        } else if (verb_is(line, len, "DATA")) {
            reply(c, "354 End data with <CR><LF>.<CR><LF>\r\n");
            int ok = 0;
            while (next_line(c, &line, &len) == 0) {
                if (len == 1 && line[0] == '.') {
                    ok = 1;
                    break;
                }
            }
            if (!ok) break;
            long n = __atomic_add_fetch(&n_msgs, 1, __ATOMIC_RELAXED);
            snprintf(buf, sizeof buf, "250 2.0.0 Ok: queued as S%ld\r\n", n);
            reply(c, buf);
        } else if (verb_is(line, len, "RSET") || verb_is(line, len, "NOOP")) {
            reply(c, "250 2.0.0 Ok\r\n");
        } else if (verb_is(line, len, "QUIT")) {
            reply(c, "221 2.0.0 Bye\r\n");
            break;
        } else if (verb_is(line, len, "XSTAT")) {
            snprintf(buf, sizeof buf, "250 msgs=%ld conns=%ld tls=%ld resumed=%ld tls13=%ld\r\n",
                     __atomic_load_n(&n_msgs, __ATOMIC_RELAXED),
                     __atomic_load_n(&n_conns, __ATOMIC_RELAXED),
                     __atomic_load_n(&n_tls, __ATOMIC_RELAXED),
                     __atomic_load_n(&n_resumed, __ATOMIC_RELAXED),
                     __atomic_load_n(&n_tls13, __ATOMIC_RELAXED));
            reply(c, buf);
        } else {
            reply(c, "502 5.5.2 Error: command not recognized\r\n");
        }
    }
    flush_out(c);
    if (c->ssl) {
        SSL_shutdown(c->ssl);
        SSL_free(c->ssl);
    }
    close(c->fd);
    free(c);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: tlssink ADDR PORT CERT.pem KEY.pem\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    ctx = SSL_CTX_new(TLS_server_method());
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_session_id_context(ctx, (const unsigned char *)"tlssink", 7);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_SERVER);
    SSL_CTX_sess_set_cache_size(ctx, 100000);
    if (SSL_CTX_use_certificate_chain_file(ctx, argv[3]) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, argv[4], SSL_FILETYPE_PEM) != 1) {
        ERR_print_errors_fp(stderr);
        return 1;
    }
    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &sa.sin_addr) != 1) return 2;
    if (bind(s, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(s, 1024) < 0) {
        perror("bind/listen");
        return 1;
    }
    socklen_t sl = sizeof sa;
    getsockname(s, (struct sockaddr *)&sa, &sl);
    printf("ready %d\n", ntohs(sa.sin_port));
    fflush(stdout);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    for (;;) {
        int fd = accept(s, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE) continue;
            perror("accept");
            return 1;
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct conn *c = calloc(1, sizeof *c);
        c->fd = fd;
        pthread_t t;
        if (pthread_create(&t, &attr, serve, c) != 0) {
            close(fd);
            free(c);
        }
    }
}
