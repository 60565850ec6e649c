/*
 * kapow -- the data client that handlers run: `kapow get`, `kapow set` and
 * `kapow unset`.
 *
 * Its behaviour is defined by the Python lean client, src/kapow/commands/data_client.py:
 * the same requests on the wire, the same output, the same messages and the
 * same exit status, down to the byte.  tests/e2e/test_data_client.py runs every
 * case against both clients, and tests/e2e/test_data_client_differential.py
 * feeds both the same random arguments, input and answers and compares them.
 * Read that module first; the functions here are named after its own.
 *
 * Every other sub-command (`kapow route ...`, `kapow --help`) is handed over,
 * with the same arguments, to the Python command line: `kapow-cli` in the
 * directory of this executable, which the server writes beside it.  For
 * `kapow route ...`, the server's pre-started command line is asked first
 * when its socket is there beside this executable (src/kapow/commands/forkserver.py
 * describes it and the request written here).
 *
 * One more mode, for the server only: `kapow --with-limits NAME=VALUE ... --
 * PROGRAM ARGS` sets resource limits on itself and executes PROGRAM in its
 * place, so the limits hold from the program's first instruction
 * (src/kapow/resource_limits.py makes these command lines; prlimit(1) does
 * the same where this client was not built).
 *
 * C11 + POSIX, libc only.
 */

#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#define CHUNK_SIZE 65536
#define MAX_HEAD 65536
#define MAX_REASON_BODY 65536
#define MAX_UNIX_PATH 107
#define DEFAULT_DATA_URL "http://localhost:8082"
#define FULL_CLI "kapow-cli"
#define FORKSERVER_SOCKET "kapow-cli.sock"

static const char USAGE[] =
    "usage: kapow get [--data-url URL] [--handler ID] RESOURCE\n"
    "       kapow set [--data-url URL] [--handler ID] RESOURCE [VALUE]\n"
    "       kapow unset [--data-url URL] [--handler ID] RESOURCE\n"
    "\n"
    "Read a request resource, or write or remove a response resource, of the\n"
    "running handler through the Kapow! data API. `get` writes the raw value to\n"
    "stdout. Without VALUE, `set` reads the value from stdin; for /response/body\n"
    "and /response/stream it is streamed as it arrives. `unset` removes every value\n"
    "of a response header or cookie written so far.\n"
    "\n"
    "Options may come before or after the arguments, but not in the place of\n"
    "VALUE: the word after the RESOURCE of `set` is its VALUE, whatever it looks\n"
    "like. After `--`, every word is an argument.\n"
    "\n"
    "options:\n"
    "  --data-url URL  data API (default: $KAPOW_DATA_URL, else " DEFAULT_DATA_URL ")\n"
    "                  http://HOST:PORT[/PREFIX] or http+unix://%2Fpath%2Fto%2Fsocket\n"
    "  --handler ID    handler id (default: $KAPOW_HANDLER_ID)\n"
    "  -h, --help      show this help and exit\n"
    "\n"
    "example:\n"
    "  name=$(kapow get /request/params/name)\n"
    "  kapow set /response/headers/Content-Type text/plain\n"
    "  echo \"Hello, $name\" | kapow set /response/body\n";

static const char MALFORMED[] = "malformed response from the data API";
static const char CLOSED_EARLY[] = "the data API closed the connection mid-response";
static const char NO_ANSWER[] = "the data API closed the connection without answering";

/* What a step ended with; the caller decides what it means, as the Python
 * client's exceptions do (OSError, _PeerClosed, DataAPIError). */
enum result {
	RES_OK,          /* done */
	RES_OS,          /* a socket call failed: errno in client.err */
	RES_PEER_CLOSED, /* the connection ended before any byte of an answer */
	RES_API,         /* a failure with its message in client.msg */
	RES_SINK,        /* the output failed: errno in client.err */
	RES_STOP,        /* the sink has all it wants */
};

/* A view of bytes owned elsewhere. */
struct bytes {
	const unsigned char *p;
	size_t n;
};

/* Bytes owned here, growing as needed. */
struct buf {
	unsigned char *p;
	size_t n, cap;
};

/* One HTTP/1.1 connection: its socket and what was received but not used. */
struct conn {
	int fd;
	struct buf in;
	size_t off;
	int close_after;
};

/* A response head, copied out of the connection's buffer. */
struct head {
	int status;
	struct buf raw;
	struct bytes version, reason, connection, transfer_encoding, content_length;
	int has_connection, has_transfer_encoding, has_content_length;
};

/* Where a response body goes. */
struct sink {
	enum { TO_FD, COLLECT, DISCARD } kind;
	int fd;
	struct buf data;
};

struct client {
	struct bytes url;
	int unix_socket;
	struct buf path;        /* NUL-terminated: socket path, or host name */
	int port;
	struct buf host_header;
	struct buf base;        /* prefix + "/handlers/" + id */
	struct buf msg;         /* the message of RES_API */
	int err;                /* the errno of RES_OS and RES_SINK */
	const char *err_text;   /* an RES_OS failure that has no errno */
	unsigned char *chunk;   /* CHUNK_SIZE bytes for reading */
};

/* -- bytes ---------------------------------------------------------------- */

static struct bytes view(const void *p, size_t n)
{
	struct bytes b = {p, n};
	return b;
}

static struct bytes cview(const char *s)
{
	return view(s, strlen(s));
}

static void out_of_memory(void)
{
	static const char text[] = "kapow: out of memory\n";
	ssize_t w = write(2, text, sizeof text - 1);
	(void)w;
	_exit(1);
}

static void buf_reserve(struct buf *b, size_t extra)
{
	if (b->cap - b->n >= extra)
		return;
	if (extra > SIZE_MAX / 2 - b->n)
		out_of_memory();
	size_t cap = b->cap ? b->cap : 256;
	while (cap - b->n < extra)
		cap *= 2;
	unsigned char *p = realloc(b->p, cap);
	if (p == NULL)
		out_of_memory();
	b->p = p;
	b->cap = cap;
}

static void buf_add(struct buf *b, const void *p, size_t n)
{
	if (n == 0)
		return;
	buf_reserve(b, n);
	memcpy(b->p + b->n, p, n);
	b->n += n;
}

static void buf_addb(struct buf *b, struct bytes v)
{
	buf_add(b, v.p, v.n);
}

static void buf_adds(struct buf *b, const char *s)
{
	buf_add(b, s, strlen(s));
}

static void buf_addc(struct buf *b, unsigned char c)
{
	buf_add(b, &c, 1);
}

static void buf_nul(struct buf *b)
{
	buf_reserve(b, 1);
	b->p[b->n] = 0;
}

static struct bytes bview(const struct buf *b)
{
	return view(b->p, b->n);
}

static int is_space(unsigned char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

static int hex_value(unsigned char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

static unsigned char lower(unsigned char c)
{
	return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
}

static int equal(struct bytes a, const char *s)
{
	size_t n = strlen(s);
	return a.n == n && memcmp(a.p, s, n) == 0;
}

static int equal_nocase(struct bytes a, const char *s)
{
	size_t n = strlen(s);
	if (a.n != n)
		return 0;
	for (size_t i = 0; i < n; i++)
		if (lower(a.p[i]) != (unsigned char)s[i])
			return 0;
	return 1;
}

/* Where `s` (lower case) first starts in `a`, ignoring case; -1 if nowhere. */
static long find_nocase(struct bytes a, const char *s)
{
	size_t n = strlen(s);
	for (size_t i = 0; i + n <= a.n; i++) {
		size_t j = 0;
		while (j < n && lower(a.p[i + j]) == (unsigned char)s[j])
			j++;
		if (j == n)
			return (long)i;
	}
	return -1;
}

static long find(struct bytes a, size_t from, const char *s, size_t n)
{
	for (size_t i = from; i + n <= a.n; i++)
		if (memcmp(a.p + i, s, n) == 0)
			return (long)i;
	return -1;
}

static long find_byte(struct bytes a, unsigned char c)
{
	const unsigned char *p = a.n ? memchr(a.p, c, a.n) : NULL;
	return p ? (long)(p - a.p) : -1;
}

static struct bytes strip(struct bytes a)
{
	while (a.n && is_space(a.p[0]))
		a.p++, a.n--;
	while (a.n && is_space(a.p[a.n - 1]))
		a.n--;
	return a;
}

static struct bytes rstrip_slash(struct bytes a)
{
	while (a.n && a.p[a.n - 1] == '/')
		a.n--;
	return a;
}

static int all_digits(struct bytes a)
{
	if (a.n == 0)
		return 0;
	for (size_t i = 0; i < a.n; i++)
		if (a.p[i] < '0' || a.p[i] > '9')
			return 0;
	return 1;
}

static int all_hex(struct bytes a)
{
	if (a.n == 0)
		return 0;
	for (size_t i = 0; i < a.n; i++)
		if (hex_value(a.p[i]) < 0)
			return 0;
	return 1;
}

/* The number `a` writes in `base`, or UINT64_MAX when it is larger. */
static uint64_t number(struct bytes a, unsigned base)
{
	uint64_t v = 0;
	for (size_t i = 0; i < a.n; i++) {
		unsigned d = (unsigned)hex_value(a.p[i]);
		if (v > (UINT64_MAX - d) / base)
			return UINT64_MAX;
		v = v * base + d;
	}
	return v;
}

/* _quote: in double quotes, every byte outside printable ASCII (and `"`, `\`) as \xNN. */
static void add_quoted(struct buf *b, struct bytes a)
{
	static const char digits[] = "0123456789abcdef";
	buf_addc(b, '"');
	for (size_t i = 0; i < a.n; i++) {
		unsigned char c = a.p[i];
		if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') {
			buf_addc(b, c);
		} else {
			unsigned char esc[4] = {'\\', 'x', (unsigned char)digits[c >> 4], (unsigned char)digits[c & 15]};
			buf_add(b, esc, 4);
		}
	}
	buf_addc(b, '"');
}

static void add_utf8(struct buf *b, unsigned long code)
{
	unsigned char u[4];
	size_t n;
	if (code < 0x80) {
		u[0] = (unsigned char)code;
		n = 1;
	} else if (code < 0x800) {
		u[0] = (unsigned char)(0xc0 | (code >> 6));
		u[1] = (unsigned char)(0x80 | (code & 0x3f));
		n = 2;
	} else if (code < 0x10000) {
		u[0] = (unsigned char)(0xe0 | (code >> 12));
		u[1] = (unsigned char)(0x80 | ((code >> 6) & 0x3f));
		u[2] = (unsigned char)(0x80 | (code & 0x3f));
		n = 3;
	} else {
		u[0] = (unsigned char)(0xf0 | (code >> 18));
		u[1] = (unsigned char)(0x80 | ((code >> 12) & 0x3f));
		u[2] = (unsigned char)(0x80 | ((code >> 6) & 0x3f));
		u[3] = (unsigned char)(0x80 | (code & 0x3f));
		n = 4;
	}
	buf_add(b, u, n);
}

/* -- system calls, retried on EINTR and looped until done ------------------ *
 * Sockets use read and write too: SIGPIPE is ignored from the start, so a
 * closed peer is EPIPE there as on a pipe. */

static int write_all(int fd, const unsigned char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = write(fd, p, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

static ssize_t read_some(int fd, unsigned char *p, size_t n)
{
	for (;;) {
		ssize_t r = read(fd, p, n);
		if (r >= 0 || errno != EINTR)
			return r;
	}
}

/* connect(), finished by waiting when a signal interrupted it. */
static int connect_to(int fd, const struct sockaddr *addr, socklen_t len)
{
	if (connect(fd, addr, len) == 0)
		return 0;
	if (errno != EINTR)
		return -1;
	struct pollfd p = {fd, POLLOUT, 0};
	while (poll(&p, 1, -1) < 0)
		if (errno != EINTR)
			return -1;
	int error = 0;
	socklen_t size = sizeof error;
	if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &size) < 0)
		return -1;
	if (error != 0) {
		errno = error;
		return -1;
	}
	return 0;
}

/* -- messages --------------------------------------------------------------- */

/*
 * The texts of system errors are the C library's, as Python's own are.  Built
 * with another C library (musl, whose programs start without the GNU one's
 * processor probing, much the faster start in a virtual machine) for a
 * Python on the GNU C library, KAPOW_GLIBC_TEXTS gives the GNU texts where
 * the two word them differently, so both clients print the same message.
 */
struct text {
	int code;
	const char *text;
};

#if defined(KAPOW_GLIBC_TEXTS) && !defined(__GLIBC__)
static const struct text GLIBC_ERRORS[] = {
	{EIO, "Input/output error"},
	{ECHILD, "No child processes"},
	{ENOMEM, "Cannot allocate memory"},
	{EBUSY, "Device or resource busy"},
	{EMFILE, "Too many open files"},
	{ENOTTY, "Inappropriate ioctl for device"},
	{ESPIPE, "Illegal seek"},
	{ERANGE, "Numerical result out of range"},
	{ENAMETOOLONG, "File name too long"},
	{ELOOP, "Too many levels of symbolic links"},
	{EOVERFLOW, "Value too large for defined data type"},
	{EILSEQ, "Invalid or incomplete multibyte or wide character"},
	{ENOTSOCK, "Socket operation on non-socket"},
	{EMSGSIZE, "Message too long"},
	{EOPNOTSUPP, "Operation not supported"},
	{EADDRINUSE, "Address already in use"},
	{EADDRNOTAVAIL, "Cannot assign requested address"},
	{ENETUNREACH, "Network is unreachable"},
	{ENETRESET, "Network dropped connection on reset"},
	{ECONNABORTED, "Software caused connection abort"},
	{EISCONN, "Transport endpoint is already connected"},
	{ENOTCONN, "Transport endpoint is not connected"},
	{ETIMEDOUT, "Connection timed out"},
	{EHOSTUNREACH, "No route to host"},
	{EINPROGRESS, "Operation now in progress"},
	{EDQUOT, "Disk quota exceeded"},
};

static const struct text GLIBC_LOOKUP_ERRORS[] = {
	{EAI_AGAIN, "Temporary failure in name resolution"},
	{EAI_BADFLAGS, "Bad value for ai_flags"},
	{EAI_FAIL, "Non-recoverable failure in name resolution"},
	{EAI_FAMILY, "ai_family not supported"},
	{EAI_MEMORY, "Memory allocation failure"},
	{EAI_NONAME, "Name or service not known"},
	{EAI_SERVICE, "Servname not supported for ai_socktype"},
	{EAI_SOCKTYPE, "ai_socktype not supported"},
};

static const char *find_text(const struct text *table, size_t n, int code)
{
	for (size_t i = 0; i < n; i++)
		if (table[i].code == code)
			return table[i].text;
	return NULL;
}
#define GLIBC_TEXT(table, code) find_text(table, sizeof table / sizeof table[0], code)
#else
#define GLIBC_TEXT(table, code) NULL
#endif

static const char *error_text(int err)
{
	const char *text = GLIBC_TEXT(GLIBC_ERRORS, err);
	return text ? text : strerror(err);
}

static const char *lookup_error_text(int gai)
{
	const char *text = GLIBC_TEXT(GLIBC_LOOKUP_ERRORS, gai);
	return text ? text : gai_strerror(gai);
}

static enum result fail(struct client *c, struct bytes text)
{
	c->msg.n = 0;
	buf_addb(&c->msg, text);
	return RES_API;
}

static enum result fail_text(struct client *c, const char *text)
{
	return fail(c, cview(text));
}

static const char *os_error_text(const struct client *c)
{
	return c->err_text ? c->err_text : error_text(c->err);
}

/* "<what> <data URL>: <the socket error>", as a failure. */
static enum result fail_os(struct client *c, const char *what)
{
	struct buf m = {0};
	buf_adds(&m, what);
	buf_addb(&m, c->url);
	buf_adds(&m, ": ");
	buf_adds(&m, os_error_text(c));
	enum result r = fail(c, bview(&m));
	free(m.p);
	return r;
}

static enum result broken(struct client *c)
{
	return fail_os(c, "connection to data API at ");
}

/* _one_line: text with a line break in it as its words joined by one space;
 * other text as it is. */
static void add_one_line(struct buf *out, struct bytes text)
{
	if (find_byte(text, '\n') < 0 && find_byte(text, '\r') < 0) {
		buf_addb(out, text);
		return;
	}
	int first = 1;
	size_t i = 0;
	while (i < text.n) {
		while (i < text.n && is_space(text.p[i]))
			i++;
		size_t start = i;
		while (i < text.n && !is_space(text.p[i]))
			i++;
		if (i > start) {
			if (!first)
				buf_addc(out, ' ');
			buf_add(out, text.p + start, i - start);
			first = 0;
		}
	}
}

/* _error: "kapow COMMAND: MESSAGE" ("kapow: MESSAGE" without a command) on
 * one line; returns the exit status 1. */
static int error_line(const char *command, struct bytes message)
{
	struct buf line = {0};
	buf_adds(&line, "kapow");
	if (command != NULL) {
		buf_addc(&line, ' ');
		buf_adds(&line, command);
	}
	buf_adds(&line, ": ");
	add_one_line(&line, message);
	buf_addc(&line, '\n');
	(void)write_all(2, line.p, line.n);
	free(line.p);
	return 1;
}

/* -- the data URL, handler id and resource ---------------------------------- */

/* _path_bytes: as request-target bytes, or a failure naming `what`. */
static enum result path_bytes(struct client *c, struct bytes data, const char *what, struct buf *out)
{
	static const char digits[] = "0123456789ABCDEF";
	for (size_t i = 0; i < data.n; i++) {
		unsigned char ch = data.p[i];
		if (ch <= 0x20 || ch == 0x7f) {
			struct buf m = {0};
			buf_adds(&m, "invalid ");
			buf_adds(&m, what);
			buf_addc(&m, ' ');
			add_quoted(&m, data);
			buf_adds(&m, ": whitespace or control character");
			enum result r = fail(c, bview(&m));
			free(m.p);
			return r;
		}
		if (ch >= 0x80 || ch == '?' || ch == '#') {
			unsigned char esc[3] = {'%', (unsigned char)digits[ch >> 4], (unsigned char)digits[ch & 15]};
			buf_add(out, esc, 3);
		} else {
			buf_addc(out, ch);
		}
	}
	return RES_OK;
}

static enum result resource_bytes(struct client *c, struct bytes resource, struct buf *out)
{
	if (resource.n == 0 || resource.p[0] != '/') {
		struct buf m = {0};
		buf_adds(&m, "invalid resource ");
		add_quoted(&m, resource);
		buf_adds(&m, ": it must start with '/'");
		enum result r = fail(c, bview(&m));
		free(m.p);
		return r;
	}
	return path_bytes(c, resource, "resource", out);
}

static enum result bad_url(struct client *c, const char *why)
{
	struct buf m = {0};
	buf_adds(&m, "invalid data URL ");
	add_quoted(&m, c->url);
	buf_adds(&m, ": ");
	buf_adds(&m, why);
	enum result r = fail(c, bview(&m));
	free(m.p);
	return r;
}

/* _parse_data_url: sets the address, the Host header and the path prefix (in c->base). */
static enum result parse_data_url(struct client *c)
{
	struct bytes url = c->url;
	long sep = find(url, 0, "://", 3);
	struct bytes scheme = view(url.p, sep < 0 ? url.n : (size_t)sep);
	if (sep < 0 || !(equal_nocase(scheme, "http") || equal_nocase(scheme, "http+unix")))
		return bad_url(c, "expected http://HOST:PORT or http+unix://SOCKET");
	c->unix_socket = equal_nocase(scheme, "http+unix");
	struct bytes rest = view(url.p + sep + 3, url.n - (size_t)sep - 3);
	long slash = find_byte(rest, '/');
	struct bytes netloc = slash < 0 ? rest : view(rest.p, (size_t)slash);
	struct bytes prefix = slash < 0 ? view(rest.p + rest.n, 0) : view(rest.p + slash, rest.n - (size_t)slash);
	prefix = rstrip_slash(prefix);
	static const unsigned char junk[2] = {'?', '#'};
	for (int j = 0; j < 2; j++) {
		long at = find_byte(prefix, junk[j]);
		if (at >= 0)
			prefix = rstrip_slash(view(prefix.p, (size_t)at));
	}
	if (netloc.n == 0 || find_byte(netloc, '@') >= 0)
		return bad_url(c, "bad host part");
	enum result r = path_bytes(c, prefix, "data URL path", &c->base);
	if (r != RES_OK)
		return r;
	if (c->unix_socket) {
		for (size_t i = 0; i < netloc.n; i++) {
			int hi = i + 2 < netloc.n ? hex_value(netloc.p[i + 1]) : -1;
			int lo = i + 2 < netloc.n ? hex_value(netloc.p[i + 2]) : -1;
			if (netloc.p[i] == '%' && hi >= 0 && lo >= 0) {
				buf_addc(&c->path, (unsigned char)(hi * 16 + lo));
				i += 2;
			} else {
				buf_addc(&c->path, netloc.p[i]);
			}
		}
		if (find_byte(bview(&c->path), 0) >= 0)
			return bad_url(c, "bad socket path");
		buf_nul(&c->path);
		buf_adds(&c->host_header, "localhost");
		return RES_OK;
	}
	struct bytes host, port;
	if (netloc.p[0] == '[') {
		struct bytes inner = view(netloc.p + 1, netloc.n - 1);
		long close = find_byte(inner, ']');
		if (close < 0)
			return bad_url(c, "bad IPv6 address");
		host = view(inner.p, (size_t)close);
		port = view(inner.p + close + 1, inner.n - (size_t)close - 1);
		if (port.n && port.p[0] != ':')
			return bad_url(c, "bad IPv6 address");
		if (port.n)
			port = view(port.p + 1, port.n - 1);
	} else {
		long colon = find_byte(netloc, ':');
		host = colon < 0 ? netloc : view(netloc.p, (size_t)colon);
		port = colon < 0 ? view(netloc.p + netloc.n, 0) : view(netloc.p + colon + 1, netloc.n - (size_t)colon - 1);
	}
	if (host.n == 0)
		return bad_url(c, "no host");
	c->port = 80;
	if (port.n) {
		uint64_t p = all_digits(port) ? number(port, 10) : 0;
		if (p == 0 || p >= 65536)
			return bad_url(c, "bad port");
		c->port = (int)p;
	}
	buf_addb(&c->path, host);
	buf_nul(&c->path);
	return path_bytes(c, netloc, "data URL host", &c->host_header);
}

/* DataClient.__init__ */
static enum result client_init(struct client *c, const char *data_url, const char *handler)
{
	if (data_url == NULL) {
		data_url = getenv("KAPOW_DATA_URL");
		if (data_url == NULL || *data_url == 0)
			data_url = DEFAULT_DATA_URL;
	}
	if (handler == NULL)
		handler = getenv("KAPOW_HANDLER_ID");
	if (handler == NULL || *handler == 0)
		return fail_text(c, "no handler id: set KAPOW_HANDLER_ID or pass --handler");
	c->url = cview(data_url);
	enum result r = parse_data_url(c);
	if (r != RES_OK)
		return r;
	buf_adds(&c->base, "/handlers/");
	size_t start = c->base.n;
	r = path_bytes(c, cview(handler), "handler id", &c->base);
	if (r != RES_OK)
		return r;
	if (find_byte(view(c->base.p + start, c->base.n - start), '/') >= 0) {
		struct buf m = {0};
		buf_adds(&m, "invalid handler id ");
		add_quoted(&m, cview(handler));
		r = fail(c, bview(&m));
		free(m.p);
		return r;
	}
	c->chunk = malloc(CHUNK_SIZE);
	if (c->chunk == NULL)
		out_of_memory();
	return RES_OK;
}

/* -- connecting --------------------------------------------------------------- */

static enum result connect_unix(struct client *c, struct conn *k)
{
	struct sockaddr_un addr;
	if (c->path.n > MAX_UNIX_PATH || c->path.n >= sizeof addr.sun_path) {
		c->err_text = "AF_UNIX path too long";
		return RES_OS;
	}
	memset(&addr, 0, sizeof addr);
	addr.sun_family = AF_UNIX;
	memcpy(addr.sun_path, c->path.p, c->path.n);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		c->err = errno;
		return RES_OS;
	}
	if (connect_to(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
		c->err = errno;
		close(fd);
		return RES_OS;
	}
	k->fd = fd;
	return RES_OK;
}

/* One candidate address: 0 with k->fd set; -1 to try the next one, -2 to
 * give up (both with the error in c->err). */
static int connect_one(struct client *c, struct conn *k, int family, const struct sockaddr *addr, socklen_t len)
{
	int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		c->err = errno;
		return -1;
	}
	if (connect_to(fd, addr, len) < 0) {
		c->err = errno;
		close(fd);
		return -1;
	}
	int one = 1;
	if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0) {
		c->err = errno;
		close(fd);
		return -2;
	}
	k->fd = fd;
	return 0;
}

static enum result connect_tcp(struct client *c, struct conn *k)
{
	const char *host = (const char *)c->path.p;
	int done = -1;
	if (equal_nocase(view(host, c->path.n), "localhost")) {
		/* loopback by definition (RFC 6761 6.3); spares the resolver */
		struct sockaddr_in v4;
		memset(&v4, 0, sizeof v4);
		v4.sin_family = AF_INET;
		v4.sin_port = htons((uint16_t)c->port);
		v4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		done = connect_one(c, k, AF_INET, (struct sockaddr *)&v4, sizeof v4);
		if (done == -1) {
			struct sockaddr_in6 v6;
			memset(&v6, 0, sizeof v6);
			v6.sin6_family = AF_INET6;
			v6.sin6_port = htons((uint16_t)c->port);
			v6.sin6_addr = in6addr_loopback;
			done = connect_one(c, k, AF_INET6, (struct sockaddr *)&v6, sizeof v6);
		}
		return done == 0 ? RES_OK : RES_OS;
	}
	char service[16];
	snprintf(service, sizeof service, "%d", c->port);
	struct addrinfo hints, *found = NULL;
	memset(&hints, 0, sizeof hints);
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	int gai = getaddrinfo(host, service, &hints, &found);
	if (gai != 0) {
		if (gai == EAI_SYSTEM)
			c->err = errno;
		else
			c->err_text = lookup_error_text(gai);
		return RES_OS;
	}
	for (struct addrinfo *a = found; a != NULL && done == -1; a = a->ai_next)
		done = connect_one(c, k, a->ai_family, a->ai_addr, a->ai_addrlen);
	freeaddrinfo(found);
	return done == 0 ? RES_OK : RES_OS;
}

/* _connect: a new connection, or the failure "cannot reach ...". */
static enum result open_conn(struct client *c, struct conn *k)
{
	memset(k, 0, sizeof *k);
	k->fd = -1;
	c->err_text = NULL;
	enum result r = c->unix_socket ? connect_unix(c, k) : connect_tcp(c, k);
	if (r != RES_OK)
		return fail_os(c, "cannot reach data API at ");
	return RES_OK;
}

static void close_conn(struct conn *k)
{
	if (k->fd >= 0)
		close(k->fd);
	k->fd = -1;
	free(k->in.p);
	memset(&k->in, 0, sizeof k->in);
	k->off = 0;
}

/* -- reading answers ----------------------------------------------------------- */

static struct bytes pending(const struct conn *k)
{
	return view(k->in.p + k->off, k->in.n - k->off);
}

/* Receive more into the connection's buffer: >0 bytes, 0 at the end, -1 on error. */
static ssize_t receive(struct client *c, struct conn *k)
{
	if (k->off > 0) {
		memmove(k->in.p, k->in.p + k->off, k->in.n - k->off);
		k->in.n -= k->off;
		k->off = 0;
	}
	buf_reserve(&k->in, CHUNK_SIZE);
	ssize_t r = read_some(k->fd, k->in.p + k->in.n, CHUNK_SIZE);
	if (r < 0)
		c->err = errno;
	else
		k->in.n += (size_t)r;
	return r;
}

/* _read_until: the bytes before `mark` (consumed with it), copied to `out`. */
static enum result read_until(struct client *c, struct conn *k, const char *mark, int first, struct buf *out)
{
	size_t len = strlen(mark), start = 0;
	for (;;) {
		struct bytes buf = pending(k);
		long end = find(buf, start, mark, len);
		if (end >= 0) {
			if ((size_t)end + len > MAX_HEAD)
				return fail_text(c, MALFORMED);
			out->n = 0;
			buf_add(out, buf.p, (size_t)end);
			k->off += (size_t)end + len;
			return RES_OK;
		}
		if (buf.n >= MAX_HEAD)
			return fail_text(c, MALFORMED);
		start = buf.n + 1 > len ? buf.n + 1 - len : 0;
		ssize_t r = receive(c, k);
		if (r < 0)
			return (buf.n && first) ? fail_text(c, CLOSED_EARLY) : RES_OS;
		if (r == 0)
			return (!buf.n && first) ? RES_PEER_CLOSED : fail_text(c, CLOSED_EARLY);
	}
}

/* One line of a head: the bytes up to CRLF, from *at on. */
static struct bytes next_line(struct bytes raw, size_t *at)
{
	struct bytes rest = view(raw.p + *at, raw.n - *at);
	long end = find(rest, 0, "\r\n", 2);
	if (end < 0) {
		*at = raw.n + 1;
		return rest;
	}
	*at += (size_t)end + 2;
	return view(rest.p, (size_t)end);
}

/* The next run of non-space bytes of `line` from *at on (empty at the end). */
static struct bytes next_word(struct bytes line, size_t *at)
{
	size_t i = *at;
	while (i < line.n && is_space(line.p[i]))
		i++;
	size_t start = i;
	while (i < line.n && !is_space(line.p[i]))
		i++;
	*at = i;
	return view(line.p + start, i - start);
}

/* _read_one_head */
static enum result read_one_head(struct client *c, struct conn *k, struct head *h)
{
	enum result r = read_until(c, k, "\r\n\r\n", 1, &h->raw);
	if (r != RES_OK)
		return r;
	struct bytes raw = bview(&h->raw);
	size_t at = 0, w = 0;
	struct bytes first = next_line(raw, &at);
	struct bytes version = next_word(first, &w);
	struct bytes status = next_word(first, &w);
	if (version.n < 5 || memcmp(version.p, "HTTP/", 5) != 0 || status.n != 3 || !all_digits(status))
		return fail_text(c, MALFORMED);
	h->version = version;
	h->status = (int)number(status, 10);
	h->reason = strip(view(first.p + w, first.n - w));
	h->has_connection = h->has_transfer_encoding = h->has_content_length = 0;
	while (at <= raw.n) {
		struct bytes line = next_line(raw, &at);
		long colon = find_byte(line, ':');
		if (colon < 0)
			continue;
		struct bytes name = strip(view(line.p, (size_t)colon));
		struct bytes value = strip(view(line.p + colon + 1, line.n - (size_t)colon - 1));
		if (equal_nocase(name, "connection")) {
			h->connection = value;
			h->has_connection = 1;
		} else if (equal_nocase(name, "transfer-encoding")) {
			h->transfer_encoding = value;
			h->has_transfer_encoding = 1;
		} else if (equal_nocase(name, "content-length")) {
			h->content_length = value;
			h->has_content_length = 1;
		}
	}
	return RES_OK;
}

/* read_head: the final head (interim 1xx answers but 101 skipped). */
static enum result read_head(struct client *c, struct conn *k, struct head *h)
{
	for (;;) {
		enum result r = read_one_head(c, k, h);
		if (r != RES_OK)
			return r;
		if (!(h->status >= 100 && h->status < 200 && h->status != 101))
			break;
	}
	struct bytes connection = h->has_connection ? h->connection : view("", 0);
	if (equal(h->version, "HTTP/1.0"))
		k->close_after = find_nocase(connection, "keep-alive") < 0;
	else
		k->close_after = find_nocase(connection, "close") >= 0;
	return RES_OK;
}

static enum result to_sink(struct client *c, struct sink *s, const unsigned char *p, size_t n)
{
	if (n == 0)
		return RES_OK;
	switch (s->kind) {
	case TO_FD:
		if (write_all(s->fd, p, n) < 0) {
			c->err = errno;
			return RES_SINK;
		}
		return RES_OK;
	case COLLECT:
		buf_add(&s->data, p, n);
		return s->data.n >= MAX_REASON_BODY ? RES_STOP : RES_OK;
	case DISCARD:
		break;
	}
	return RES_OK;
}

/* _exactly: `remaining` bytes of body to the sink. */
static enum result exactly(struct client *c, struct conn *k, uint64_t remaining, struct sink *s)
{
	struct bytes buf = pending(k);
	if (buf.n) {
		size_t take = remaining < buf.n ? (size_t)remaining : buf.n;
		k->off += take;
		remaining -= take;
		enum result r = to_sink(c, s, buf.p, take);
		if (r != RES_OK)
			return r;
	}
	while (remaining > 0) {
		size_t want = remaining < CHUNK_SIZE ? (size_t)remaining : CHUNK_SIZE;
		ssize_t got = read_some(k->fd, c->chunk, want);
		if (got < 0) {
			c->err = errno;
			return RES_OS;
		}
		if (got == 0)
			return fail_text(c, CLOSED_EARLY);
		remaining -= (uint64_t)got;
		enum result r = to_sink(c, s, c->chunk, (size_t)got);
		if (r != RES_OK)
			return r;
	}
	return RES_OK;
}

static enum result read_line(struct client *c, struct conn *k, struct buf *line)
{
	return read_until(c, k, "\r\n", 0, line);
}

/* _chunked */
static enum result chunked(struct client *c, struct conn *k, struct sink *s)
{
	struct buf line = {0};
	enum result r;
	for (;;) {
		if ((r = read_line(c, k, &line)) != RES_OK)
			break;
		struct bytes size = bview(&line);
		long semicolon = find_byte(size, ';');
		if (semicolon >= 0)
			size.n = (size_t)semicolon;
		size = strip(size);
		if (!all_hex(size)) {
			r = fail_text(c, MALFORMED);
			break;
		}
		uint64_t n = number(size, 16);
		if (n == 0) {
			while ((r = read_line(c, k, &line)) == RES_OK && line.n > 0)
				; /* trailers, up to the empty line */
			break;
		}
		if ((r = exactly(c, k, n, s)) != RES_OK)
			break;
		if ((r = read_line(c, k, &line)) != RES_OK)
			break;
		if (line.n > 0) {
			r = fail_text(c, MALFORMED);
			break;
		}
	}
	free(line.p);
	return r;
}

/* body: the response body to the sink; RES_STOP when the sink had enough. */
static enum result body(struct client *c, struct conn *k, const struct head *h, struct sink *s)
{
	if (h->status == 204 || h->status == 304)
		return RES_OK;
	if (h->has_transfer_encoding && find_nocase(h->transfer_encoding, "chunked") >= 0)
		return chunked(c, k, s);
	if (h->has_content_length) {
		if (!all_digits(h->content_length))
			return fail_text(c, MALFORMED);
		return exactly(c, k, number(h->content_length, 10), s);
	}
	k->close_after = 1;
	struct bytes buf = pending(k);
	k->off += buf.n;
	enum result r = to_sink(c, s, buf.p, buf.n);
	while (r == RES_OK) {
		ssize_t got = read_some(k->fd, c->chunk, CHUNK_SIZE);
		if (got < 0) {
			c->err = errno;
			return RES_OS;
		}
		if (got == 0)
			break;
		r = to_sink(c, s, c->chunk, (size_t)got);
	}
	return r;
}

/* _json_string: the string of the member named by `key`, in its quotes
 * ("\"reason\"", "\"detail\""), of a JSON body as UTF-8 into out, or 0 when
 * there is none. */
static int json_string(struct bytes body, const char *key, struct buf *out)
{
	size_t size = strlen(key);
	long found = find(body, 0, key, size);
	if (found < 0)
		return 0;
	size_t i = (size_t)found + size, n = body.n;
	while (i < n && (body.p[i] == ' ' || body.p[i] == '\t' || body.p[i] == '\r' || body.p[i] == '\n'))
		i++;
	if (i >= n || body.p[i] != ':')
		return 0;
	i++;
	while (i < n && (body.p[i] == ' ' || body.p[i] == '\t' || body.p[i] == '\r' || body.p[i] == '\n'))
		i++;
	if (i >= n || body.p[i] != '"')
		return 0;
	i++;
	while (i < n) {
		size_t end = i;
		while (end < n && body.p[end] != '"' && body.p[end] != '\\')
			end++;
		buf_add(out, body.p + i, end - i);
		if (end >= n)
			return 0;
		if (body.p[end] == '"')
			return 1;
		if (end + 1 >= n)
			return 0;
		unsigned char e = body.p[end + 1];
		if (e == 'u') {
			if (end + 6 > n || !all_hex(view(body.p + end + 2, 4)))
				return 0;
			unsigned long code = (unsigned long)number(view(body.p + end + 2, 4), 16);
			i = end + 6;
			if (code >= 0xd800 && code < 0xdc00 && i + 6 <= n && body.p[i] == '\\' && body.p[i + 1] == 'u' &&
			    all_hex(view(body.p + i + 2, 4))) {
				unsigned long low = (unsigned long)number(view(body.p + i + 2, 4), 16);
				if (low >= 0xdc00 && low < 0xe000) {
					code = 0x10000 + ((code - 0xd800) << 10) + (low - 0xdc00);
					i += 6;
				}
			}
			if (code >= 0xd800 && code < 0xe000)
				code = 0xfffd;
			add_utf8(out, code);
			continue;
		}
		static const char from[] = "\"\\/bfnrt", to[] = "\"\\/\b\f\n\r\t";
		const char *at = memchr(from, e, sizeof from - 1);
		if (at == NULL)
			return 0;
		buf_addc(out, (unsigned char)to[at - from]);
		i = end + 2;
	}
	return 0;
}

/* _reason_of: "REASON: DETAIL" of a non-200 answer, each on one line: the
 * JSON "reason" of its body and its "detail" when it has one, else the status
 * line's reason phrase (or the status) alone. */
static void reason_of(const struct head *h, struct bytes data, struct buf *text)
{
	struct buf field = {0};
	if (json_string(data, "\"reason\"", &field) && field.n > 0) {
		add_one_line(text, bview(&field));
		field.n = 0;
		if (json_string(data, "\"detail\"", &field) && field.n > 0) {
			buf_adds(text, ": ");
			add_one_line(text, bview(&field));
		}
	} else if (h->reason.n) {
		add_one_line(text, h->reason);
	} else {
		char status[32];
		snprintf(status, sizeof status, "HTTP status %d", h->status);
		buf_adds(text, status);
	}
	free(field.p);
}

/* _refusal: the failure of a non-200 answer, with the server's reason and detail. */
static enum result refusal(struct client *c, struct conn *k, const struct head *h)
{
	struct sink s = {COLLECT, -1, {0}};
	(void)body(c, k, h, &s);
	struct bytes data = bview(&s.data);
	if (data.n > MAX_REASON_BODY)
		data.n = MAX_REASON_BODY;
	struct buf text = {0};
	reason_of(h, data, &text);
	enum result r = fail(c, bview(&text));
	free(text.p);
	free(s.data.p);
	return r;
}

/* -- requests ------------------------------------------------------------------ */

static void add_head(struct client *c, struct buf *b, const char *method, struct bytes target, long length, int close)
{
	buf_adds(b, method);
	buf_addc(b, ' ');
	buf_addb(b, target);
	buf_adds(b, " HTTP/1.1\r\nHost: ");
	buf_addb(b, bview(&c->host_header));
	buf_adds(b, "\r\n");
	if (length >= 0) {
		char line[64];
		snprintf(line, sizeof line, "Content-Length: %ld\r\n", length);
		buf_adds(b, "Content-Type: application/octet-stream\r\n");
		buf_adds(b, line);
	}
	if (close)
		buf_adds(b, "Connection: close\r\n");
	buf_adds(b, "\r\n");
}

/* _call: one GET (the value of `target` to stdout, as iter_get + get_into)
 * or one DELETE (unset: its answer discarded). */
static enum result call(struct client *c, const char *method, struct bytes target)
{
	struct conn k;
	enum result r = open_conn(c, &k);
	if (r != RES_OK)
		return r;
	struct buf request = {0};
	struct head h = {0};
	add_head(c, &request, method, target, -1, 1);
	if (write_all(k.fd, request.p, request.n) < 0) {
		c->err = errno;
		r = RES_OS;
	} else {
		r = read_head(c, &k, &h);
	}
	if (r == RES_PEER_CLOSED) {
		r = fail_text(c, NO_ANSWER);
	} else if (r == RES_OK && h.status != 200) {
		r = refusal(c, &k, &h);
	} else if (r == RES_OK) {
		struct sink out = {strcmp(method, "GET") == 0 ? TO_FD : DISCARD, 1, {0}};
		r = body(c, &k, &h, &out);
	}
	if (r == RES_OS)
		r = broken(c);
	free(request.p);
	free(h.raw.p);
	close_conn(&k);
	return r;
}

/* _exchange: one PUT sent on `k`, and the head of its answer. */
static enum result exchange(struct client *c, struct conn *k, struct bytes target, struct bytes value,
			    struct head *h)
{
	struct buf request = {0};
	add_head(c, &request, "PUT", target, (long)value.n, 0);
	int sent;
	if (value.n <= CHUNK_SIZE) {
		buf_addb(&request, value);
		sent = write_all(k->fd, request.p, request.n);
	} else {
		sent = write_all(k->fd, request.p, request.n);
		if (sent == 0)
			sent = write_all(k->fd, value.p, value.n);
	}
	free(request.p);
	if (sent < 0) {
		/* The server may have refused early and closed: its answer wins. */
		int send_error = errno;
		if (read_head(c, k, h) == RES_OK)
			return RES_OK;
		c->err = send_error;
		c->err_text = NULL;
		return RES_OS;
	}
	return read_head(c, k, h);
}

/* _put_one: one PUT, on `k` when it is open (retried on a new connection
 * when the server had closed it), else on a new one. */
static enum result put_one(struct client *c, struct conn *k, struct bytes target, struct bytes value)
{
	struct head h = {0};
	enum result r;
	for (;;) {
		int fresh = k->fd < 0;
		if (fresh && (r = open_conn(c, k)) != RES_OK)
			break;
		r = exchange(c, k, target, value, &h);
		if (r == RES_OS || r == RES_PEER_CLOSED) {
			/* Nothing of an answer arrived.  On a kept-alive connection
			 * that means the server had closed it: retry on a new one. */
			close_conn(k);
			if (!fresh)
				continue;
			r = r == RES_PEER_CLOSED ? fail_text(c, NO_ANSWER) : broken(c);
			break;
		}
		if (r != RES_OK) {
			close_conn(k);
			break;
		}
		if (h.status != 200) {
			r = refusal(c, k, &h);
		} else {
			struct sink none = {DISCARD, -1, {0}};
			r = body(c, k, &h, &none);
			if (r == RES_OS)
				r = broken(c);
		}
		if (r != RES_OK || k->close_after)
			close_conn(k);
		break;
	}
	free(h.raw.p);
	return r;
}

/* set with VALUE, or with stdin for a resource that is not streamed. */
static enum result set_value(struct client *c, struct bytes target, struct bytes value)
{
	struct conn k = {.fd = -1};
	enum result r = put_one(c, &k, target, value);
	close_conn(&k);
	return r;
}

/* set from stdin: every read a PUT (streamed), or all of it in one. */
static enum result set_stdin(struct client *c, struct bytes target, int streamed)
{
	struct conn k = {.fd = -1};
	struct buf all = {0};
	enum result r = RES_OK;
	int sent = 0;
	for (;;) {
		ssize_t got = read_some(0, c->chunk, CHUNK_SIZE);
		if (got < 0) {
			c->err = errno;
			r = RES_SINK;
			break;
		}
		if (got == 0)
			break;
		if (!streamed) {
			buf_add(&all, c->chunk, (size_t)got);
			continue;
		}
		if ((r = put_one(c, &k, target, view(c->chunk, (size_t)got))) != RES_OK)
			break;
		sent = 1;
	}
	if (r == RES_OK && (!streamed || !sent))
		r = put_one(c, &k, target, bview(&all));
	free(all.p);
	close_conn(&k);
	return r;
}

/* -- the command line ---------------------------------------------------------- */

struct args {
	const char *data_url, *handler;
	const char **positionals;
	int count;
};

/* A usage error: the message in m, then " (see kapow COMMAND --help)", goes
 * to c->msg; m is freed.  Returns -1. */
static int usage_error(struct client *c, const char *command, struct buf *m)
{
	buf_adds(m, " (see kapow ");
	buf_adds(m, command);
	buf_adds(m, " --help)");
	fail(c, bview(m));
	free(m->p);
	return -1;
}

/* _parse_args: 0 to go on, 1 for help, -1 with the failure in c->msg.
 * Options may come before or after the arguments, but the word after the
 * RESOURCE of `set` is its VALUE whatever it looks like; a "--" there is
 * still the end of the options. */
static int parse_args(struct client *c, int argc, char **argv, const char *command, struct args *a)
{
	int set = strcmp(command, "set") == 0, i = 2;
	struct buf m = {0};
	while (i < argc) {
		const char *arg = argv[i++];
		if (strcmp(arg, "--") == 0) {
			while (i < argc)
				a->positionals[a->count++] = argv[i++];
			break;
		}
		if (set && a->count == 1) {
			a->positionals[a->count++] = arg;
			continue;
		}
		if (strcmp(arg, "-h") == 0 || strcmp(arg, "--help") == 0)
			return 1;
		const char *eq = strchr(arg, '=');
		struct bytes name = eq ? view(arg, (size_t)(eq - arg)) : cview(arg);
		if (equal(name, "--data-url") || equal(name, "--handler")) {
			const char *value = eq ? eq + 1 : NULL;
			if (value == NULL) {
				if (i >= argc) {
					buf_adds(&m, "option ");
					buf_addb(&m, name);
					buf_adds(&m, " needs a value");
					return usage_error(c, command, &m);
				}
				value = argv[i++];
			}
			if (equal(name, "--data-url"))
				a->data_url = value;
			else
				a->handler = value;
		} else if (arg[0] == '-' && arg[1] != 0) {
			buf_adds(&m, "unknown option ");
			add_quoted(&m, cview(arg));
			return usage_error(c, command, &m);
		} else {
			a->positionals[a->count++] = arg;
		}
	}
	int limit = set ? 2 : 1;
	if (a->count == 0) {
		buf_adds(&m, "missing RESOURCE");
		return usage_error(c, command, &m);
	}
	if (a->count > limit) {
		buf_adds(&m, "unexpected argument ");
		add_quoted(&m, cview(a->positionals[limit]));
		return usage_error(c, command, &m);
	}
	return 0;
}

extern char **environ;

/* Read one byte from fd, retrying on EINTR: the byte, or -1 at the end or on error. */
static int read_byte(int fd)
{
	unsigned char c;
	for (;;) {
		ssize_t n = read(fd, &c, 1);
		if (n == 1)
			return c;
		if (n < 0 && errno == EINTR)
			continue;
		return -1;
	}
}

/* `kapow route ...` through the server's pre-started command line listening
 * at `path`: its exit status, or -1 when it cannot be asked (no socket, no
 * working directory, a standard descriptor closed), to run kapow-cli instead. */
static int forked(const char *path, int argc, char **argv)
{
	struct sockaddr_un addr;
	if (strlen(path) >= sizeof addr.sun_path)
		return -1;
	char cwd[4096];
	if (getcwd(cwd, sizeof cwd) == NULL)
		return -1;
	struct buf req = {0};
	buf_add(&req, "\0\0\0\0", 4);
	char count[16];
	snprintf(count, sizeof count, "%d", argc);
	buf_add(&req, count, strlen(count) + 1);
	for (int i = 0; i < argc; i++)
		buf_add(&req, argv[i], strlen(argv[i]) + 1);
	buf_add(&req, cwd, strlen(cwd) + 1);
	for (char **e = environ; *e != NULL; e++)
		buf_add(&req, *e, strlen(*e) + 1);
	size_t size = req.n - 4;
	for (int i = 0; i < 4; i++)
		req.p[i] = (unsigned char)(size >> (8 * (3 - i)));

	int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s < 0) {
		free(req.p);
		return -1;
	}
	memset(&addr, 0, sizeof addr);
	addr.sun_family = AF_UNIX;
	memcpy(addr.sun_path, path, strlen(path) + 1);
	int r;
	do
		r = connect(s, (struct sockaddr *)&addr, sizeof addr);
	while (r < 0 && errno == EINTR);
	if (r < 0) {
		close(s);
		free(req.p);
		return -1;
	}
	/* the descriptors go with the first byte; the rest follows as a stream */
	union {
		char space[CMSG_SPACE(3 * sizeof(int))];
		struct cmsghdr align;
	} control;
	memset(&control, 0, sizeof control);
	struct iovec first = {.iov_base = req.p, .iov_len = 1};
	struct msghdr msg = {.msg_iov = &first, .msg_iovlen = 1, .msg_control = control.space,
			     .msg_controllen = sizeof control.space};
	struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
	cmsg->cmsg_level = SOL_SOCKET;
	cmsg->cmsg_type = SCM_RIGHTS;
	cmsg->cmsg_len = CMSG_LEN(3 * sizeof(int));
	int fds[3] = {0, 1, 2};
	memcpy(CMSG_DATA(cmsg), fds, sizeof fds);
	ssize_t sent;
	do
		sent = sendmsg(s, &msg, MSG_NOSIGNAL);
	while (sent < 0 && errno == EINTR);
	if (sent != 1) { /* EBADF: a standard descriptor is closed */
		close(s);
		free(req.p);
		return -1;
	}
	/* asked: from here on, its answer is the answer */
	int status = 0;
	for (size_t at = 1; at < req.n && status == 0;) {
		sent = send(s, req.p + at, req.n - at, MSG_NOSIGNAL);
		if (sent > 0)
			at += (size_t)sent;
		else if (errno != EINTR)
			status = -1;
	}
	free(req.p);
	if (status == 0)
		status = read_byte(s);
	close(s);
	if (status < 0)
		return error_line(NULL, cview("the kapow command line of the server ended without an exit status"));
	return status;
}

/* The limits of --with-limits, by the names of src/kapow/resource_limits.py. */
static const struct {
	const char *name;
	int resource;
} LIMITS[] = {
	{"memory", RLIMIT_AS},	       {"cpu", RLIMIT_CPU},	    {"open_files", RLIMIT_NOFILE},
	{"file_size", RLIMIT_FSIZE}, {"processes", RLIMIT_NPROC},
};

/* One NAME=VALUE of --with-limits applied to this process; 0, or -1 with a
 * message in `m`. cpu gets its hard limit one second after its soft one, so
 * SIGXCPU comes before SIGKILL. */
static int apply_limit(const char *word, struct buf *m)
{
	const char *eq = strchr(word, '=');
	for (size_t i = 0; eq != NULL && i < sizeof LIMITS / sizeof LIMITS[0]; i++) {
		size_t n = strlen(LIMITS[i].name);
		if ((size_t)(eq - word) != n || strncmp(word, LIMITS[i].name, n) != 0)
			continue;
		struct bytes digits = cview(eq + 1);
		if (digits.n == 0 || digits.n > 19 || !all_digits(digits))
			break;
		unsigned long long value = strtoull(eq + 1, NULL, 10);
		struct rlimit r = {.rlim_cur = (rlim_t)value, .rlim_max = (rlim_t)value};
		if (LIMITS[i].resource == RLIMIT_CPU)
			r.rlim_max = (rlim_t)value + 1;
		if (setrlimit(LIMITS[i].resource, &r) == 0)
			return 0;
		buf_adds(m, "cannot set limit ");
		buf_adds(m, word);
		buf_adds(m, ": ");
		buf_adds(m, error_text(errno));
		return -1;
	}
	buf_adds(m, "--with-limits: not a limit: ");
	buf_adds(m, word);
	return -1;
}

/* `kapow --with-limits NAME=VALUE ... -- PROGRAM ARGS`: PROGRAM under the
 * limits, in this process; status 127 when it cannot be run. */
static int with_limits(int argc, char **argv)
{
	struct buf m = {0};
	int i = 2;
	for (; i < argc && strcmp(argv[i], "--") != 0; i++)
		if (apply_limit(argv[i], &m) < 0) {
			error_line(NULL, bview(&m));
			return 127;
		}
	if (i + 1 >= argc) {
		error_line(NULL, cview("--with-limits: no program after --"));
		return 127;
	}
	execv(argv[i + 1], argv + i + 1);
	buf_adds(&m, "cannot run ");
	buf_adds(&m, argv[i + 1]);
	buf_adds(&m, ": ");
	buf_adds(&m, error_text(errno));
	error_line(NULL, bview(&m));
	return 127;
}

/* Every command but get, set and unset: the Python command line beside this file. */
static int hand_over(int argc, char **argv)
{
	char self[4096];
	ssize_t n = readlink("/proc/self/exe", self, sizeof self - sizeof FORKSERVER_SOCKET - 1);
	if (n <= 0 || (size_t)n >= sizeof self - sizeof FORKSERVER_SOCKET - 1)
		return error_line(NULL, cview("cannot find the kapow command line: /proc/self/exe is unreadable"));
	while (n > 0 && self[n - 1] != '/')
		n--;
	if (argc > 1 && (strcmp(argv[1], "route") == 0 || strcmp(argv[1], "handler") == 0)) {
		memcpy(self + n, FORKSERVER_SOCKET, sizeof FORKSERVER_SOCKET);
		int status = forked(self, argc, argv);
		if (status >= 0)
			return status;
	}
	memcpy(self + n, FULL_CLI, sizeof FULL_CLI);
	execv(self, argv);
	struct buf m = {0};
	buf_adds(&m, "cannot run the kapow command line ");
	buf_adds(&m, self);
	buf_adds(&m, ": ");
	buf_adds(&m, error_text(errno));
	error_line(NULL, bview(&m));
	free(m.p);
	return 1;
}

static void interrupted(int signum)
{
	(void)signum;
	_exit(130);
}

/* Python's start: SIGPIPE ignored (a closed pipe is EPIPE), and a SIGINT
 * that was not ignored ends the command with status 130. */
static void set_signals(void)
{
	struct sigaction sa, old;
	memset(&sa, 0, sizeof sa);
	sigemptyset(&sa.sa_mask);
	sa.sa_handler = SIG_IGN;
	sigaction(SIGPIPE, &sa, NULL);
	if (sigaction(SIGINT, NULL, &old) == 0 && old.sa_handler == SIG_DFL) {
		sa.sa_handler = interrupted;
		sigaction(SIGINT, &sa, NULL);
	}
}

int main(int argc, char **argv)
{
	if (argc > 1 && strcmp(argv[1], "--with-limits") == 0)
		return with_limits(argc, argv);
	if (argc < 2 || (strcmp(argv[1], "get") != 0 && strcmp(argv[1], "set") != 0 && strcmp(argv[1], "unset") != 0))
		return hand_over(argc, argv);
	set_signals();
	const char *command = argv[1];
	struct client c = {0};
	struct args a = {0};
	a.positionals = calloc((size_t)argc, sizeof *a.positionals);
	if (a.positionals == NULL)
		out_of_memory();
	int parsed = parse_args(&c, argc, argv, command, &a);
	if (parsed < 0)
		return error_line(command, bview(&c.msg));
	if (parsed > 0) {
		if (write_all(1, (const unsigned char *)USAGE, sizeof USAGE - 1) == 0)
			return 0;
		struct buf m = {0};
		buf_adds(&m, "cannot write help: ");
		buf_adds(&m, error_text(errno));
		return error_line(command, bview(&m));
	}
	struct buf target = {0};
	if (client_init(&c, a.data_url, a.handler) != RES_OK)
		return error_line(command, bview(&c.msg));
	buf_addb(&target, bview(&c.base));
	if (resource_bytes(&c, cview(a.positionals[0]), &target) != RES_OK)
		return error_line(command, bview(&c.msg));
	struct bytes resource = view(target.p + c.base.n, target.n - c.base.n);
	enum result r;
	if (strcmp(command, "get") == 0 || strcmp(command, "unset") == 0)
		r = call(&c, strcmp(command, "get") == 0 ? "GET" : "DELETE", bview(&target));
	else if (a.count == 2)
		r = set_value(&c, bview(&target), cview(a.positionals[1]));
	else
		r = set_stdin(&c, bview(&target), equal(resource, "/response/body") || equal(resource, "/response/stream"));
	if (r == RES_OK)
		return 0;
	if (r == RES_SINK) {
		if (c.err == EPIPE) /* the reader of stdout went away (`kapow get ... | head`) */
			return 1;
		struct buf m = {0};
		buf_adds(&m, strcmp(command, "get") == 0 ? "cannot write output: " : "cannot read input: ");
		buf_adds(&m, error_text(c.err));
		return error_line(command, bview(&m));
	}
	return error_line(NULL, bview(&c.msg)); /* what the data API answered, or why it could not be reached */
}
