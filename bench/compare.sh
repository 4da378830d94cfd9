#!/usr/bin/env bash
# bench/compare.sh: fulcrum vs nginx vs HAProxy as round-robin HTTP/1.1 reverse proxies.
#
# All three proxies sit in front of the same three upstreams (one separate nginx process,
# 127.0.0.1:19081-19083). Each proxy runs with one worker pinned to CPU 0; the upstream
# nginx and wrk share CPU 1, so the proxy under test is the only thing on its core.
# Rounds are interleaved (each round runs every proxy once, in a rotated order) so slow
# drifts of a shared, noisy machine hit all three alike; the medians over rounds are
# reported.
#
# Usage:   bash bench/compare.sh
# Options (environment variables):
#   ROUNDS=3 DURATION=10 CONNECTIONS=64 THREADS_WRK=1
#   WARMUP=2          seconds of discarded wrk load before every measured run
#   FLOOR_DURATION=5  seconds of each one-connection latency-floor run
#   KEEP_TMP=1        keep the temp dir (configs, logs) instead of deleting it
#   FULCRUM_BIN=path  measure that fulcrum binary instead of building this checkout
#   TLS=1             clients speak HTTPS to the proxies (TLS termination with one
#                     self-signed ECDSA P-256 certificate made by openssl per run; the
#                     upstreams stay plain HTTP); keep-alive, so handshakes are amortised
#
# Output: a markdown table on stdout, the section between `<!-- compare:begin -->` and
# `<!-- compare:end -->` (with TLS=1: `compare-tls:begin/end`) of BENCHMARKS.md rewritten,
# and the raw per-run wrk output in bench/results/compare-<timestamp>.txt (git-ignored).
#
# The functions can be sourced (bench/profile.sh does) without running anything.

set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-64}
THREADS_WRK=${THREADS_WRK:-1}
WARMUP=${WARMUP:-2}
FLOOR_DURATION=${FLOOR_DURATION:-5}
KEEP_TMP=${KEEP_TMP:-0}
TLS=${TLS:-0}
SCHEME=http
[[ "$TLS" == 1 ]] && SCHEME=https

# Fixed ports: the brief names them, and fixed ports make the commands in BENCHMARKS.md
# reproducible. Busy ports are detected and reported before anything starts.
UPSTREAM_PORTS=(19081 19082 19083)
declare -A PROXY_PORT=([fulcrum]=18080 [nginx]=18081 [haproxy]=18082)
PROXIES=(fulcrum nginx haproxy)
PROXY_CPU=0 # the proxy under test, alone
LOAD_CPU=1  # wrk and the upstream nginx

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# FULCRUM_BIN=path runs that binary instead of building the checkout (an A/B of builds).
FULCRUM_BIN_GIVEN=${FULCRUM_BIN:+1}
FULCRUM_BIN=${FULCRUM_BIN:-$REPO/target/release/fulcrum}
CLK_TCK=$(getconf CLK_TCK)

TMP=""               # mktemp -d, set by setup_tmp
declare -a STARTED=() # pids of every process this script started, for cleanup
declare -A PID=()     # role -> pid (upstream, fulcrum, nginx, haproxy)
WRK_PID=""            # the wrk run in progress, if any

log() { printf '[compare] %s\n' "$*" >&2; }
die() {
	printf '[compare] error: %s\n' "$*" >&2
	exit 1
}

# ---------------------------------------------------------------------------------------
# Setup and teardown

ensure_tools() {
	# Install only what is missing, and refresh the package index only when installing.
	local missing=() tool pkg
	local tools=(wrk:wrk nginx:nginx haproxy:haproxy taskset:util-linux)
	[[ "$TLS" == 1 ]] && tools+=(openssl:openssl curl:curl)
	for tool in "${tools[@]}"; do
		pkg=${tool#*:}
		tool=${tool%%:*}
		command -v "$tool" >/dev/null 2>&1 || missing+=("$pkg")
	done
	if ((${#missing[@]})); then
		((EUID == 0)) || die "missing ${missing[*]}: run as root or install them first"
		log "installing: ${missing[*]}"
		# Debian starts a package's system service on install (nginx on :80); a temporary
		# policy-rc.d that answers 101 forbids that, so the install leaves nothing running.
		local policy=/usr/sbin/policy-rc.d
		if [[ -e "$policy" ]]; then
			apt-get update
			DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
		else
			(
				trap 'rm -f "$policy"' EXIT
				printf '#!/bin/sh\nexit 101\n' >"$policy"
				chmod 755 "$policy"
				apt-get update
				DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
			)
		fi
	fi
	command -v cargo >/dev/null 2>&1 || die "cargo not found: install a Rust toolchain (rustup)"
}

build_fulcrum() {
	if [[ -n "$FULCRUM_BIN_GIVEN" ]]; then
		[[ -x "$FULCRUM_BIN" ]] || die "FULCRUM_BIN=$FULCRUM_BIN is not an executable"
		log "using $FULCRUM_BIN (not built from this checkout)"
		return
	fi
	log "cargo build --release -p fulcrum"
	(cd "$REPO" && cargo build --release -p fulcrum) >&2
	[[ -x "$FULCRUM_BIN" ]] || die "build did not produce $FULCRUM_BIN"
}

setup_tmp() {
	TMP=$(mktemp -d "${TMPDIR:-/tmp}/fulcrum-compare.XXXXXX")
	mkdir -p "$TMP"/{upstream,nginx,haproxy,fulcrum,tls}
	[[ "$TLS" == 1 ]] && make_certificate
	return 0
}

# make_certificate: one self-signed ECDSA P-256 certificate for 127.0.0.1, used by the
# three proxies ($TMP/tls/cert.pem + key.pem; HAProxy wants both in one file).
make_certificate() {
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
		-subj /CN=bench.local -addext subjectAltName=IP:127.0.0.1 \
		-keyout "$TMP/tls/key.pem" -out "$TMP/tls/cert.pem" 2>"$TMP/tls/openssl.log" ||
		die "openssl could not make a certificate: $(cat "$TMP/tls/openssl.log")"
	cat "$TMP/tls/cert.pem" "$TMP/tls/key.pem" >"$TMP/tls/combined.pem"
}

# Stops every process we started: TERM, then KILL after 5 s. Runs on every exit path
# (normal end, error under `set -e`, Ctrl-C, TERM).
cleanup() {
	local rc=$? pid i
	trap - EXIT INT TERM
	if [[ -n "$WRK_PID" ]]; then
		kill -TERM "$WRK_PID" 2>/dev/null || true
		wait "$WRK_PID" 2>/dev/null || true
	fi
	for pid in "${STARTED[@]}"; do
		kill -TERM "$pid" 2>/dev/null || true
	done
	for pid in "${STARTED[@]}"; do
		for ((i = 0; i < 50; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		if kill -0 "$pid" 2>/dev/null; then
			log "pid $pid ignored SIGTERM for 5 s; sending SIGKILL"
			kill -KILL "$pid" 2>/dev/null || true
		fi
		wait "$pid" 2>/dev/null || true
	done
	if [[ -n "$TMP" && -d "$TMP" ]]; then
		if ((rc != 0)); then
			# On failure the logs are what one needs: show their ends.
			local f
			for f in "$TMP"/*/*.log; do
				[[ -s "$f" ]] || continue
				log "--- tail of $f"
				tail -n 15 "$f" >&2 || true
			done
		fi
		if [[ "$KEEP_TMP" == 1 ]]; then
			log "kept $TMP"
		else
			rm -rf "$TMP"
		fi
	fi
	exit "$rc"
}

install_traps() {
	trap cleanup EXIT
	# Async children of a non-interactive shell ignore SIGINT, so Ctrl-C only reaches
	# wrk and us; exiting runs cleanup, which TERMs the servers.
	trap 'exit 130' INT
	trap 'exit 143' TERM
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

check_ports_free() {
	local port p
	for port in "${UPSTREAM_PORTS[@]}" "${PROXY_PORT[@]}"; do
		if port_open "$port"; then
			p=$(ss -Hltnp "sport = :$port" 2>/dev/null | grep -o 'users:.*' | head -n1 || true)
			die "port 127.0.0.1:$port is already in use ${p:+($p)}; stop that process (or an earlier run of this script) first"
		fi
	done
}

# start ROLE CPU LOGFILE CMD...: starts CMD in the background pinned to CPU, records its pid.
# taskset execs CMD, so $! is the pid of the server itself (what /proc is read for).
start() {
	local role=$1 cpu=$2 logfile=$3
	shift 3
	taskset -c "$cpu" "$@" >"$logfile" 2>&1 &
	PID[$role]=$!
	STARTED+=("$!")
}

# wait_port ROLE PORT: waits up to 10 s for PORT to accept connections; fails if the
# process died meanwhile.
wait_port() {
	local role=$1 port=$2 i
	for ((i = 0; i < 100; i++)); do
		kill -0 "${PID[$role]}" 2>/dev/null || die "$role exited during startup (see its log above)"
		port_open "$port" && return 0
		sleep 0.1
	done
	die "$role did not listen on 127.0.0.1:$port within 10 s"
}

# http_get PORT: prints "STATUS BODY" of one GET / on a fresh connection, with bash only.
http_get() {
	local port=$1 status body line
	if [[ "$TLS" == 1 ]]; then
		# Certificate not verified: it is the run's own self-signed one.
		body=$(curl -sk --max-time 5 -H 'Host: bench.local' -w '\n%{http_code}' "https://127.0.0.1:$port/") || body=$'\nnone'
		printf '%s %s\n' "${body##*$'\n'}" "$(printf '%s' "${body%$'\n'*}" | tr -d '\r\n')"
		return
	fi
	exec 3<>"/dev/tcp/127.0.0.1/$port"
	printf 'GET / HTTP/1.1\r\nHost: bench.local\r\nConnection: close\r\n\r\n' >&3
	IFS=' ' read -r -t 5 _ status _ <&3 || status=none
	# Skip the headers, keep the last body line.
	while IFS= read -r -t 5 line <&3; do [[ "$line" == $'\r' ]] && break; done
	body=$(timeout 5 cat <&3 | tr -d '\r\n')
	exec 3<&-
	printf '%s %s\n' "$status" "$body"
}

# check_rr NAME PORT: the proxy answers 200 and spreads six requests over all three
# upstreams (each upstream answers a distinct body), i.e. it really balances.
check_rr() {
	local name=$1 port=$2 i reply seen=""
	for ((i = 0; i < 6; i++)); do
		reply=$(http_get "$port")
		[[ "$reply" == "200 "* ]] || die "$name on :$port answered '$reply' instead of 200"
		seen+="${reply#200 }"$'\n'
	done
	local distinct
	distinct=$(printf '%s' "$seen" | sort -u | grep -c .)
	((distinct == 3)) || die "$name sent 6 requests to only $distinct upstream(s): $(printf '%s' "$seen" | tr '\n' ' ')"
	log "$name on :$port answers 200 and reaches all 3 upstreams"
}

write_upstream_conf() {
	local conf="$TMP/upstream/nginx.conf" i=0 port
	{
		cat <<EOF
# Upstream: one nginx process, three servers with a tiny fixed body each.
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 16384;
pid $TMP/upstream/nginx.pid;
error_log $TMP/upstream/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    default_type text/plain;
    client_body_temp_path $TMP/upstream/client_body;
    proxy_temp_path $TMP/upstream/proxy;
    fastcgi_temp_path $TMP/upstream/fastcgi;
    uwsgi_temp_path $TMP/upstream/uwsgi;
    scgi_temp_path $TMP/upstream/scgi;
EOF
		for port in "${UPSTREAM_PORTS[@]}"; do
			i=$((i + 1))
			printf '    server { listen 127.0.0.1:%s; location / { return 200 "ok %s\\n"; } }\n' "$port" "$i"
		done
		echo "}"
	} >"$conf"
}

write_fulcrum_conf() {
	local port
	{
		cat <<EOF
# Fulcrum under test: one listener, one round-robin pool, no health check (default
# outlier detection stays on). Admin on an ephemeral port so it never collides.
runtime: { drain_timeout: 1s }
log: { level: warn }
admin: { listen: "127.0.0.1:0" }
listeners:
  - name: bench
    listen: 127.0.0.1:${PROXY_PORT[fulcrum]}
$([[ "$TLS" == 1 ]] && printf '    tls: { certificate: %s, private_key: %s }' "$TMP/tls/cert.pem" "$TMP/tls/key.pem")
    routes:
      - pool: upstreams
pools:
  upstreams:
    strategy: round_robin
    backends:
EOF
		for port in "${UPSTREAM_PORTS[@]}"; do
			echo "      - address: 127.0.0.1:$port"
		done
	} >"$TMP/fulcrum/fulcrum.yaml"
}

write_nginx_conf() {
	local port
	{
		cat <<EOF
# nginx under test: a single process (no master) so the pid measured does the work.
# keepalive_requests are raised on both sides so neither connection is recycled every
# 1000 requests (fulcrum and HAProxy do not recycle them).
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 16384;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_body_temp_path $TMP/nginx/client_body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    upstream upstreams {
EOF
		for port in "${UPSTREAM_PORTS[@]}"; do
			echo "        server 127.0.0.1:$port;"
		done
		cat <<EOF
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }
    server {
        listen 127.0.0.1:${PROXY_PORT[nginx]}$([[ "$TLS" == 1 ]] && echo " ssl");
$([[ "$TLS" == 1 ]] && printf '        ssl_certificate %s;\n        ssl_certificate_key %s;' "$TMP/tls/cert.pem" "$TMP/tls/key.pem")
        location / {
            proxy_pass http://upstreams;
            proxy_http_version 1.1;
            proxy_connect_timeout 1s;
            proxy_read_timeout 30s;
            # Same forwarded headers as fulcrum (which always sets these).
            proxy_set_header Connection "";
            proxy_set_header Host \$http_host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Forwarded-Host \$host;
        }
    }
}
EOF
	} >"$TMP/nginx/nginx.conf"
}

write_haproxy_conf() {
	local port i=0
	{
		cat <<EOF
# HAProxy under test: one thread, no logging, keep-alive on both sides.
global
    nbthread 1
    maxconn 8192
defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 1s
    timeout client 60s
    timeout server 30s
    timeout http-keep-alive 60s
frontend bench
    bind 127.0.0.1:${PROXY_PORT[haproxy]}$([[ "$TLS" == 1 ]] && echo " ssl crt $TMP/tls/combined.pem alpn http/1.1")
    # Same forwarded headers as fulcrum (which always sets these).
    option forwardfor
    http-request set-header X-Forwarded-Proto $SCHEME
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    default_backend upstreams
backend upstreams
    balance roundrobin
EOF
		for port in "${UPSTREAM_PORTS[@]}"; do
			i=$((i + 1))
			echo "    server u$i 127.0.0.1:$port"
		done
	} >"$TMP/haproxy/haproxy.cfg"
}

start_upstream() {
	write_upstream_conf
	start upstream "$LOAD_CPU" "$TMP/upstream/stderr.log" \
		nginx -e "$TMP/upstream/error.log" -p "$TMP/upstream" -c "$TMP/upstream/nginx.conf"
	local port
	for port in "${UPSTREAM_PORTS[@]}"; do wait_port upstream "$port"; done
	log "upstream nginx (pid ${PID[upstream]}) on ${UPSTREAM_PORTS[*]}"
}

start_fulcrum() {
	write_fulcrum_conf
	"$FULCRUM_BIN" check --config "$TMP/fulcrum/fulcrum.yaml" >&2
	# stdout carries the ready line; stderr the logs.
	taskset -c "$PROXY_CPU" "$FULCRUM_BIN" run --config "$TMP/fulcrum/fulcrum.yaml" --threads 1 \
		>"$TMP/fulcrum/stdout.log" 2>"$TMP/fulcrum/stderr.log" &
	PID[fulcrum]=$!
	STARTED+=("$!")
	local i
	for ((i = 0; i < 100; i++)); do
		kill -0 "${PID[fulcrum]}" 2>/dev/null || die "fulcrum exited during startup"
		grep -q '"event":"ready"' "$TMP/fulcrum/stdout.log" && break
		sleep 0.1
	done
	grep -q '"event":"ready"' "$TMP/fulcrum/stdout.log" || die "fulcrum printed no ready line within 10 s"
	wait_port fulcrum "${PROXY_PORT[fulcrum]}"
	log "fulcrum (pid ${PID[fulcrum]}): $(head -n1 "$TMP/fulcrum/stdout.log")"
}

start_nginx() {
	write_nginx_conf
	# -e: the error log before the config is read, so the system one is never touched.
	nginx -t -q -e "$TMP/nginx/error.log" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" >&2 ||
		die "nginx rejected its config"
	start nginx "$PROXY_CPU" "$TMP/nginx/stderr.log" \
		nginx -e "$TMP/nginx/error.log" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf"
	wait_port nginx "${PROXY_PORT[nginx]}"
	log "nginx (pid ${PID[nginx]}) on :${PROXY_PORT[nginx]}"
}

start_haproxy() {
	write_haproxy_conf
	haproxy -c -q -f "$TMP/haproxy/haproxy.cfg" >&2 || die "haproxy rejected its config"
	# -db: foreground, no daemon, no master: the started pid is the one serving.
	start haproxy "$PROXY_CPU" "$TMP/haproxy/stderr.log" haproxy -db -f "$TMP/haproxy/haproxy.cfg"
	wait_port haproxy "${PROXY_PORT[haproxy]}"
	log "haproxy (pid ${PID[haproxy]}) on :${PROXY_PORT[haproxy]}"
}

# ---------------------------------------------------------------------------------------
# Measurement helpers

# proc_ticks PID: utime+stime (clock ticks) of PID and every descendant. /proc/PID/stat
# of a thread-group leader already sums its threads. Field 2 (comm) may hold spaces, so
# split after the last ')'.
proc_ticks() {
	local pid=$1 total=0 stat rest child
	local -a f
	if stat=$(cat "/proc/$pid/stat" 2>/dev/null); then
		rest=${stat##*) }
		read -r -a f <<<"$rest"
		# rest starts at field 3 (state): utime = field 14 -> f[11], stime = 15 -> f[12]
		total=$((f[11] + f[12]))
	fi
	for child in $(pgrep -P "$pid" 2>/dev/null || true); do
		total=$((total + $(proc_ticks "$child")))
	done
	echo "$total"
}

# cpu_ticks CPU: "busy steal" jiffies of one CPU from /proc/stat. busy (user, nice,
# system, irq, softirq) shows how loaded each core was, whoever used it; steal shows the
# time the hypervisor gave our vCPU to someone else (noise on a shared VM).
cpu_ticks() {
	awk -v c="cpu$1" '$1 == c { print $2 + $3 + $4 + $7 + $8, $9 }' /proc/stat
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
# verdict EXPR: "met" if the awk expression EXPR holds.
verdict() { if awk "BEGIN { exit !($1) }"; then echo "met"; else echo "**not met**"; fi; }

# vm_mib PID FIELD: VmRSS / VmHWM in MiB.
vm_mib() {
	awk -v k="$2:" '$1 == k { printf "%.1f", $2 / 1024 }' "/proc/$1/status"
}

# wrk_parse FILE: "rps p50_ms p99_ms requests non2xx socket_errors" from wrk --latency output.
wrk_parse() {
	awk '
		function ms(v) {
			if (v ~ /us$/) { sub(/us$/, "", v); return v / 1000 }
			if (v ~ /ms$/) { sub(/ms$/, "", v); return v + 0 }
			if (v ~ /m$/)  { sub(/m$/, "", v);  return v * 60000 }
			if (v ~ /s$/)  { sub(/s$/, "", v);  return v * 1000 }
			return v + 0
		}
		$1 == "50%" { p50 = ms($2) }
		$1 == "99%" { p99 = ms($2) }
		/requests in/ { reqs = $1 }
		/Non-2xx or 3xx responses:/ { non2xx = $NF }
		/Socket errors:/ { gsub(/,/, ""); errs = $4 + $6 + $8 + $10 }
		$1 == "Requests/sec:" { rps = $2 }
		END {
			if (rps == "") exit 1
			printf "%.2f %.3f %.3f %d %d %d\n", rps, p50, p99, reqs, non2xx + 0, errs + 0
		}' "$1"
}

# wrk_run SECONDS CONNS THREADS PORT OUTFILE [SCHEME]: one wrk run on the load CPU
# (SCHEME defaults to the proxies' one; the upstreams are always plain http).
# wrk runs in the background and we `wait` for it: a trapped signal interrupts `wait` at
# once, whereas for a foreground child that handles SIGINT itself (wrk does: it stops and
# prints its results) bash would assume the child consumed the Ctrl-C and carry on.
wrk_run() {
	local rc=0
	taskset -c "$LOAD_CPU" wrk -t"$3" -c"$2" -d"$1"s --latency "${6:-$SCHEME}://127.0.0.1:$4/" >"$5" 2>&1 &
	WRK_PID=$!
	wait "$WRK_PID" || rc=$?
	WRK_PID=""
	((rc == 0)) || die "wrk failed against :$4 (exit $rc): $(tail -n 3 "$5")"
}

# median: median of the numbers on stdin (mean of the two middle ones for an even count).
median() {
	sort -g | awk '{ v[NR] = $1 } END {
		if (NR == 0) { print "nan"; exit }
		if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

fmt() { LC_ALL=C printf "%.${1}f" "$2"; }

# measure PROXY ROUND: warm-up, then one measured run with CPU accounting; appends a row to
# $RUNS ("round proxy rps p50 p99 cpu_share req_per_cpu_s requests non2xx errors cpu0 cpu1")
# and the raw wrk output to $RAW.
measure() {
	local proxy=$1 round=$2 port=${PROXY_PORT[$1]} pid=${PID[$1]}
	local out="$TMP/wrk-$proxy-$round.txt"
	wrk_run "$WARMUP" "$CONNECTIONS" "$THREADS_WRK" "$port" "$TMP/warmup.txt"

	local t0 t1 c0 c1 b0a b1a b0b b1b s0a s0b
	c0=$(proc_ticks "$pid")
	read -r b0a s0a <<<"$(cpu_ticks "$PROXY_CPU")"
	read -r b1a _ <<<"$(cpu_ticks "$LOAD_CPU")"
	t0=$EPOCHREALTIME
	wrk_run "$DURATION" "$CONNECTIONS" "$THREADS_WRK" "$port" "$out"
	t1=$EPOCHREALTIME
	c1=$(proc_ticks "$pid")
	read -r b0b s0b <<<"$(cpu_ticks "$PROXY_CPU")"
	read -r b1b _ <<<"$(cpu_ticks "$LOAD_CPU")"

	local parsed
	parsed=$(wrk_parse "$out") || die "cannot parse wrk output for $proxy: $(cat "$out")"
	local rps p50 p99 reqs non2xx errs
	read -r rps p50 p99 reqs non2xx errs <<<"$parsed"
	local row
	row=$(awk -v rps="$rps" -v c0="$c0" -v c1="$c1" -v t0="$t0" -v t1="$t1" -v hz="$CLK_TCK" \
		-v b0a="$b0a" -v b0b="$b0b" -v b1a="$b1a" -v b1b="$b1b" -v s0a="$s0a" -v s0b="$s0b" 'BEGIN {
			wall = t1 - t0
			share = (c1 - c0) / hz / wall
			per = share > 0 ? rps / share : 0
			printf "%.4f %.1f %.3f %.3f %.3f", share, per, (b0b - b0a) / hz / wall, (b1b - b1a) / hz / wall, (s0b - s0a) / hz / wall
		}')
	local share per cpu0 cpu1 steal0
	read -r share per cpu0 cpu1 steal0 <<<"$row"
	echo "$round $proxy $rps $p50 $p99 $share $per $reqs $non2xx $errs $cpu0 $cpu1 $steal0" >>"$RUNS"
	{
		echo "=== round $round: $proxy (:$port), wall $(fmt 2 "$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')") s"
		echo "proxy CPU share $share, req per CPU-s $per, CPU$PROXY_CPU busy $cpu0, CPU$LOAD_CPU busy $cpu1, CPU$PROXY_CPU steal $steal0, loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
		cat "$out"
	} >>"$RAW"
	log "round $round $proxy: $(fmt 0 "$rps") req/s, p50 $(fmt 2 "$p50") ms, p99 $(fmt 2 "$p99") ms, CPU $(fmt 2 "$share"), $(fmt 0 "$per") req/CPU-s, CPU$PROXY_CPU steal $(fmt 2 "$steal0")"
	if ((non2xx > 0 || errs > 0)); then
		log "WARNING: $proxy had $non2xx non-2xx responses and $errs socket errors in round $round"
	fi
}

# floor NAME PORT [SCHEME]: one connection, no queueing: the latency floor through NAME.
floor() {
	local name=$1 port=$2 scheme=${3:-$SCHEME} out="$TMP/floor-$1.txt"
	wrk_run 1 1 1 "$port" "$TMP/warmup.txt" "$scheme"
	wrk_run "$FLOOR_DURATION" 1 1 "$port" "$out" "$scheme"
	local rps p50 p99 rest
	read -r rps p50 p99 rest <<<"$(wrk_parse "$out")"
	echo "$name $rps $p50 $p99" >>"$FLOORS"
	{
		echo "=== floor: $name (:$port), wrk -t1 -c1 -d${FLOOR_DURATION}s"
		cat "$out"
	} >>"$RAW"
	log "floor $name: p50 $(fmt 3 "$p50") ms, p99 $(fmt 3 "$p99") ms, $(fmt 0 "$rps") req/s"
}

# col N PROXY FILE: median of column N over the rows of PROXY.
col_median() { awk -v n="$1" -v p="$2" '$2 == p { print $n }' "$3" | median; }

# ---------------------------------------------------------------------------------------
# Report

versions() {
	local hash dirty=""
	hash=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
	[[ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ]] && dirty="+uncommitted changes"
	[[ -n "$FULCRUM_BIN_GIVEN" ]] && hash="binary $FULCRUM_BIN, checkout $hash"
	echo "fulcrum $("$FULCRUM_BIN" --version | awk '{print $2}') (git $hash$dirty), $(nginx -v 2>&1 | sed 's/^nginx version: //'), $(haproxy -v | head -n1 | awk '{print "HAProxy " $3}'), wrk $(wrk -v 2>&1 | head -n1 | awk '{print $2}')"
}

# negotiated: "proxy protocol cipher" for each proxy, as `openssl s_client` gets them.
negotiated() {
	local p out=()
	for p in "${PROXIES[@]}"; do
		out+=("$p $(openssl s_client -connect "127.0.0.1:${PROXY_PORT[$p]}" </dev/null 2>/dev/null |
			sed -n 's/^New, \([^,]*\), Cipher is \(.*\)$/\1 \2/p' | head -n1)")
	done
	local IFS=';'
	echo "${out[*]}" | sed 's/;/; /g'
}

report() {
	local when=$1 cpu_model kernel
	cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
	kernel=$(uname -r)
	local p rps p50 p99 share per non2xx errs
	declare -A M_RPS M_P50 M_P99 M_SHARE M_PER M_ERR M_CPU0 M_CPU1 M_STEAL
	for p in "${PROXIES[@]}"; do
		M_RPS[$p]=$(col_median 3 "$p" "$RUNS")
		M_P50[$p]=$(col_median 4 "$p" "$RUNS")
		M_P99[$p]=$(col_median 5 "$p" "$RUNS")
		M_SHARE[$p]=$(col_median 6 "$p" "$RUNS")
		M_PER[$p]=$(col_median 7 "$p" "$RUNS")
		M_CPU0[$p]=$(col_median 11 "$p" "$RUNS")
		M_CPU1[$p]=$(col_median 12 "$p" "$RUNS")
		M_STEAL[$p]=$(col_median 13 "$p" "$RUNS")
		M_ERR[$p]=$(awk -v p="$p" '$2 == p { s += $9 + $10 } END { print s + 0 }' "$RUNS")
	done
	{
		if [[ "$TLS" == 1 ]]; then
			echo "### HTTPS results ($when)"
			echo
			echo "\`TLS=1\`: clients speak TLS to each proxy (one self-signed ECDSA P-256 certificate; fulcrum rustls with *ring*, nginx and HAProxy OpenSSL $(openssl version | awk '{print $2}')), HTTP/1.1 keep-alive, so the measure is mostly record encryption and decryption; the upstreams stay plain HTTP. Protocol and cipher that \`openssl s_client\` (the library wrk uses) negotiates: $(negotiated)."
		else
			echo "### Results ($when)"
		fi
		echo
		echo "Machine: $(nproc) CPUs, $cpu_model, Linux $kernel; load average at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg)."
		echo "Versions: $(versions)."
		echo
		echo "Settings: ROUNDS=$ROUNDS DURATION=${DURATION}s CONNECTIONS=$CONNECTIONS THREADS_WRK=$THREADS_WRK, warm-up ${WARMUP}s before each run, rounds interleaved (order rotated each round); medians over $ROUNDS rounds."
		echo
		echo "| proxy | req/s | p50 ms | p99 ms | proxy CPU (cores) | req per CPU-s | RSS / peak MiB | errors | CPU$PROXY_CPU busy (steal) / CPU$LOAD_CPU busy |"
		echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
		for p in "${PROXIES[@]}"; do
			echo "| $p | $(fmt 0 "${M_RPS[$p]}") | $(fmt 2 "${M_P50[$p]}") | $(fmt 2 "${M_P99[$p]}") | $(fmt 2 "${M_SHARE[$p]}") | $(fmt 0 "${M_PER[$p]}") | ${RSS[$p]} | ${M_ERR[$p]} | $(fmt 2 "${M_CPU0[$p]}") ($(fmt 2 "${M_STEAL[$p]}")) / $(fmt 2 "${M_CPU1[$p]}") |"
		done
		echo
		echo "Per round (req/s, p99 ms):"
		echo
		local line
		for p in "${PROXIES[@]}"; do
			line=$(awk -v p="$p" '$2 == p { printf "%s r%s %.0f / %.2f", (n++ ? ";" : ""), $1, $3, $5 }' "$RUNS")
			echo "- $p:$line"
		done
		echo
		echo "Ratios (fulcrum ÷ other), and the product goal:"
		echo
		echo "| | vs nginx | vs HAProxy |"
		echo "| --- | ---: | ---: |"
		echo "| req/s | $(ratio "${M_RPS[fulcrum]}" "${M_RPS[nginx]}") | $(ratio "${M_RPS[fulcrum]}" "${M_RPS[haproxy]}") |"
		echo "| req per CPU-s | $(ratio "${M_PER[fulcrum]}" "${M_PER[nginx]}") | $(ratio "${M_PER[fulcrum]}" "${M_PER[haproxy]}") |"
		echo "| p99 | $(ratio "${M_P99[fulcrum]}" "${M_P99[nginx]}") | $(ratio "${M_P99[fulcrum]}" "${M_P99[haproxy]}") |"
		echo
		echo "- req per CPU-s ≥ nginx: $(verdict "${M_PER[fulcrum]} >= ${M_PER[nginx]}")"
		echo "- req per CPU-s within 10% of HAProxy: $(verdict "${M_PER[fulcrum]} >= 0.9 * ${M_PER[haproxy]}")"
		echo "- p99 no worse than nginx: $(verdict "${M_P99[fulcrum]} <= ${M_P99[nginx]}"); than HAProxy: $(verdict "${M_P99[fulcrum]} <= ${M_P99[haproxy]}")"
		echo
		echo "Latency floor (\`wrk -t1 -c1 -d${FLOOR_DURATION}s --latency\`, one connection, no queueing):"
		echo
		echo "| target | p50 ms | p99 ms | req/s |"
		echo "| --- | ---: | ---: | ---: |"
		local name
		while read -r name rps p50 p99; do
			echo "| $name | $(fmt 3 "$p50") | $(fmt 3 "$p99") | $(fmt 0 "$rps") |"
		done <"$FLOORS"
		echo
		echo "Raw per-run wrk output: \`bench/results/$(basename "$RAW")\` (not committed)."
	} >"$TMP/section.md"
}

write_benchmarks_md() {
	local md="$REPO/BENCHMARKS.md"
	if [[ ! -f "$md" ]]; then
		cat >"$md" <<'EOF'
# Benchmarks

## fulcrum vs nginx vs HAProxy (`bench/compare.sh`)

What is measured: fulcrum, nginx and HAProxy as round-robin HTTP/1.1 reverse proxies in
front of the same three upstreams (one separate nginx process serving a 5-byte body on
127.0.0.1:19081-19083, keep-alive, no access log), in one run of

```
bash bench/compare.sh            # ROUNDS=3 DURATION=10 CONNECTIONS=64 THREADS_WRK=1
```

Setup, identical for the three proxies:
- each proxy runs one worker pinned to CPU 0 (`taskset -c 0`); the upstream nginx and wrk
  share CPU 1 (`taskset -c 1`);
  - fulcrum: `fulcrum run --config fulcrum.yaml --threads 1` (one worker thread plus its
    control thread, both on CPU 0), pool strategy `round_robin`, `log: { level: warn }`,
    no health check, default outlier detection;
  - nginx: `master_process off; daemon off; worker_processes 1`, `upstream { keepalive 64 }`,
    `proxy_http_version 1.1`, `proxy_set_header Connection ""`, `access_log off`;
  - HAProxy: `nbthread 1`, `mode http`, `balance roundrobin`, `http-reuse always`,
    `option http-keep-alive`, no logging, `haproxy -db`;
- keep-alive on both sides everywhere (nginx `keepalive_requests` raised to 1000000 so it
  does not recycle connections every 1000 requests); nginx and HAProxy set
  `X-Forwarded-For`, `X-Forwarded-Proto` and `X-Forwarded-Host` as fulcrum always does;
- load: `taskset -c 1 wrk -t1 -c64 -d10s --latency http://127.0.0.1:PORT/`, after a 2 s
  discarded warm-up; rounds are interleaved (every proxy once per round, order rotated)
  and the median over rounds is reported;
- proxy CPU = (utime + stime) of the proxy process from `/proc/PID/stat` over the run ÷
  wall time; req per CPU-s = req/s ÷ proxy CPU, the throughput one core would give;
  RSS and peak RSS (VmRSS, VmHWM) are read after all runs;
- the configs, generated per run, are in `bench/compare.sh`.

Read with care:
- wrk is closed-loop: with 64 connections, latencies include queueing in the proxy and
  suffer from coordinated omission (a slow response delays the next request instead of
  being counted against it). They compare proxies under the same load; they are not
  service-time latencies. The one-connection latency floor is given beside them; a
  result below the floor is a measurement bug.
- The machine is a shared 2-core VM; other tenants' load shows in the run-to-run spread
  (per-round numbers below, raw output in `bench/results/`).
- If CPU 1 (wrk + upstream) is saturated, req/s can be capped by the load generator and
  not by the proxy; req per CPU-s is then the fairer comparison (the table shows how busy
  each core was).
- Over loopback the kernel runs the receiver's TCP input in the sender's context, so
  "proxy CPU" includes part of the peers' network stack (and they carry part of the
  proxy's). It is the same for the three proxies, but it makes kernel time the larger part
  of every proxy's cost, so user-space differences show up diluted in the ratios.
- The latency floor through any proxy (~0.13 ms) is set by cross-CPU wake-ups on this VM
  (the idle proxy core is woken twice per request), not by the proxies' own work
  (~16–19 µs of CPU per request at saturation); it cannot rank the proxies here.

<!-- compare:begin -->
<!-- compare:end -->
EOF
	fi
	if ! grep -q '<!-- compare:begin -->' "$md"; then
		printf '\n<!-- compare:begin -->\n<!-- compare:end -->\n' >>"$md"
	fi
	local marker=compare
	[[ "$TLS" == 1 ]] && marker=compare-tls
	if ! grep -q "<!-- $marker:begin -->" "$md"; then
		printf '\n<!-- %s:begin -->\n<!-- %s:end -->\n' "$marker" "$marker" >>"$md"
	fi
	local new="$TMP/BENCHMARKS.md"
	awk -v section="$TMP/section.md" -v begin="<!-- $marker:begin -->" -v end="<!-- $marker:end -->" '
		$0 == begin { print; while ((getline l < section) > 0) print l; skip = 1; next }
		$0 == end { skip = 0 }
		!skip { print }' "$md" >"$new"
	cat "$new" >"$md"
	log "updated $md"
}

# ---------------------------------------------------------------------------------------

start_all() {
	check_ports_free
	setup_tmp
	start_upstream
	start_fulcrum
	start_nginx
	start_haproxy
	local p
	for p in "${PROXIES[@]}"; do check_rr "$p" "${PROXY_PORT[$p]}"; done
}

main() {
	[[ "$ROUNDS" =~ ^[1-9][0-9]*$ && "$DURATION" =~ ^[1-9][0-9]*$ && "$CONNECTIONS" =~ ^[1-9][0-9]*$ && "$THREADS_WRK" =~ ^[1-9][0-9]*$ ]] ||
		die "ROUNDS, DURATION, CONNECTIONS and THREADS_WRK must be positive integers"
	((CONNECTIONS >= THREADS_WRK)) || die "CONNECTIONS must be >= THREADS_WRK (wrk requirement)"
	(($(nproc) >= 2)) || die "needs at least 2 CPUs (proxy on CPU $PROXY_CPU, load on CPU $LOAD_CPU)"
	install_traps
	ensure_tools
	build_fulcrum
	start_all

	local stamp
	stamp=$(date +%Y%m%d-%H%M%S)
	mkdir -p "$REPO/bench/results"
	RAW="$REPO/bench/results/compare-$stamp.txt"
	RUNS="$TMP/runs.txt"
	FLOORS="$TMP/floors.txt"
	: >"$RUNS"
	: >"$FLOORS"
	LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
	{
		echo "# bench/compare.sh $(date -Is)"
		echo "# ROUNDS=$ROUNDS DURATION=$DURATION CONNECTIONS=$CONNECTIONS THREADS_WRK=$THREADS_WRK WARMUP=$WARMUP"
		echo "# $(versions)"
		echo "# $(nproc) CPUs, $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), Linux $(uname -r)"
	} >"$RAW"

	local round i n=${#PROXIES[@]}
	for ((round = 1; round <= ROUNDS; round++)); do
		for ((i = 0; i < n; i++)); do
			measure "${PROXIES[(i + round - 1) % n]}" "$round"
		done
	done

	# Floors after the rounds, so every pool is warm.
	floor upstream-direct "${UPSTREAM_PORTS[0]}" http
	local p
	for p in "${PROXIES[@]}"; do floor "$p" "${PROXY_PORT[$p]}"; done

	declare -gA RSS=()
	for p in "${PROXIES[@]}"; do
		RSS[$p]="$(vm_mib "${PID[$p]}" VmRSS) / $(vm_mib "${PID[$p]}" VmHWM)"
	done
	{
		echo "=== per-run rows: round proxy rps p50_ms p99_ms cpu_share req_per_cpu_s requests non2xx socket_errors cpu${PROXY_CPU}_busy cpu${LOAD_CPU}_busy cpu${PROXY_CPU}_steal"
		cat "$RUNS"
		echo "=== RSS/HWM MiB: fulcrum ${RSS[fulcrum]}, nginx ${RSS[nginx]}, haproxy ${RSS[haproxy]}"
	} >>"$RAW"

	report "$(date '+%Y-%m-%d %H:%M %Z')"
	echo >>"$RAW"
	cat "$TMP/section.md" >>"$RAW"
	cat "$TMP/section.md"
	write_benchmarks_md
	log "raw results: $RAW"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
	main "$@"
fi
