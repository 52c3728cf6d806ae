"""A real nginx on 127.0.0.1 for the --url tests and bench/url_bench.py: its own prefix
directory, generated config (``daemon off``, pid file, error and access logs inside the prefix,
no root-owned default paths), a free port, and the memory files under ``root``.

The access log has one line per request: ``METHOD RANGE STATUS BYTES IF-MATCH``.

``latency=True`` (bench/url_bench.py) loads Debian's echo module (libnginx-mod-http-echo) for
``/lat/SECONDS/NAME``: NAME answered after SECONDS, as an object store's time to the first byte,
by nginx's own static module (ranges, ETag, If-Match/If-Range)."""
import os
import shutil
import signal
import socket
import subprocess
import time

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                  else None)

#: Debian's libnginx-mod-http-echo: echo_sleep, then echo_exec to the static file
ECHO_MODULE = "/usr/lib/nginx/modules/ngx_http_echo_module.so"
LATENCY_LOCATION = r"""
        location ~ ^/lat/(?<secs>[0-9.]+)/(?<rest>.*)$ {{
            echo_sleep $secs;
            echo_exec /$rest $args;
        }}"""

CONF = """
{load}
{user}
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp;
    proxy_temp_path {prefix}/tmp;
    fastcgi_temp_path {prefix}/tmp;
    uwsgi_temp_path {prefix}/tmp;
    scgi_temp_path {prefix}/tmp;
    log_format ranges '$request_method "$http_range" $status $body_bytes_sent '
                      '"$http_if_match" $uri';
    keepalive_requests 100000;
    # /slow/: ranges from 0 and from 2621440 at full speed, from 262144 at 64 KiB/s, others at
    # 16 KiB/s (nginx sends one second's worth at once: a 256K chunk takes 3 s, 15 s): for the
    # fetch-scheduling tests
    map $http_range $slow_rate {{
        "~^bytes=0-" 0;
        "~^bytes=2621440-" 0;
        "~^bytes=262144-" 64k;
        default 16k;
    }}
    # /cut/: ranges from 262144 at 64 KiB/s, others at full speed: a request for the chunks
    # from 1 on that is broken off (nginx stopped) after chunk 1 resumes at full speed
    map $http_range $cut_rate {{
        "~^bytes=262144-" 64k;
        default 0;
    }}
    sendfile on;
    types {{ }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port}{ssl};
        {ssl_conf}
        access_log {prefix}/access.log ranges;
        root {root};
        location /norange/ {{ alias {root}/; max_ranges 0; }}
        location /slow/ {{ alias {root}/; limit_rate $slow_rate; }}
        location /cut/ {{ alias {root}/; limit_rate $cut_rate; }}
        location = /forbidden {{ return 403; }}
        location = /unauthorized {{ return 401; }}
        location = /broken {{ return 500; }}{latency}
        location /auth/ {{
            alias {root}/;
            if ($http_authorization != "Bearer {token}") {{ return 401; }}
        }}
    }}
}}
"""

TOKEN = "s3cr3t-t0ken"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Nginx:
    def __init__(self, prefix, cert=None, key=None, latency=False):
        self.prefix = str(prefix)
        self.root = os.path.join(self.prefix, "www")
        os.makedirs(self.root, exist_ok=True)
        os.makedirs(os.path.join(self.prefix, "tmp"), exist_ok=True)
        self.port = free_port()
        ssl_conf = ""
        if cert:
            ssl_conf = "ssl_certificate %s; ssl_certificate_key %s;" % (cert, key)
        self.scheme = "https" if cert else "http"
        if latency and not os.path.exists(ECHO_MODULE):
            raise RuntimeError("no %s: apt-get install libnginx-mod-http-echo" % ECHO_MODULE)
        with open(os.path.join(self.prefix, "nginx.conf"), "w") as f:
            f.write(CONF.format(prefix=self.prefix, port=self.port, root=self.root,
                                ssl=" ssl" if cert else "", ssl_conf=ssl_conf, token=TOKEN,
                                load="load_module %s;" % ECHO_MODULE if latency else "",
                                latency=LATENCY_LOCATION.format() if latency else "",
                                # as root, workers would switch to nobody, who cannot read
                                # the test's private temporary directories
                                user="user root;" if os.geteuid() == 0 else ""))
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen([NGINX, "-p", self.prefix, "-c",
                                      os.path.join(self.prefix, "nginx.conf"), "-e",
                                      os.path.join(self.prefix, "error.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("nginx failed: %s" % self.proc.stderr.read().decode())
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("nginx did not listen on %d" % self.port)

    def url(self, path, latency=0.0):
        """The URL of ``path``; ``latency`` seconds before each answer (``latency=True``)."""
        if latency:
            path = "lat/%.3f/%s" % (latency, path.lstrip("/"))    # echo_sleep: ms at most
        return "%s://127.0.0.1:%d/%s" % (self.scheme, self.port, path.lstrip("/"))

    def put(self, name, data, mtime=None):
        path = os.path.join(self.root, name)
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        if mtime is not None:
            os.utime(path + ".tmp", (mtime, mtime))
        os.rename(path + ".tmp", path)
        return path

    def requests(self):
        """The access log: a list of (method, range, status, bytes, if_match, uri)."""
        path = os.path.join(self.prefix, "access.log")
        if not os.path.exists(path):
            return []
        out = []
        with open(path) as f:
            for line in f:
                line = line.replace("\\x22", '"')     # nginx escapes quotes in values
                method, rest = line.split(" ", 1)
                rng, rest = rest[1:].split('" ', 1)
                status, nbytes, rest = rest.split(" ", 2)
                im, uri = rest[1:].rsplit('" ', 1)
                out.append((method, rng, int(status), int(nbytes), im, uri.strip()))
        return out

    def clear_log(self):
        path = os.path.join(self.prefix, "access.log")
        if os.path.exists(path):
            open(path, "w").close()
            if self.proc and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGUSR1)     # reopen the log
                time.sleep(0.2)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)         # fast shutdown: drops connections
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
