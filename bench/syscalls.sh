#!/usr/bin/env bash
# bench/syscalls.sh: where each proxy's CPU goes per request — user vs kernel time, and
# system calls by kind — for fulcrum, nginx and HAProxy in compare.sh's set-up.
#
# compare.sh reports requests per proxy CPU-second; this splits that CPU into user time
# (the proxy's own code and libraries) and system time (the kernel on its behalf), and
# counts the proxy's system calls per request with `perf stat` on the syscall
# tracepoints. Same bed as compare.sh: the proxy alone on CPU 0 with one worker, wrk and
# the upstream nginx on CPU 1, HTTP/1.1 keep-alive both sides, ROUNDS interleaved rounds.
# Times come from /proc/PID/stat (clock ticks, so a run needs a few seconds to be
# precise); they are medians over the rounds, and the syscall breakdown is the last
# round's.
#
# Usage:   bash bench/syscalls.sh      (needs perf, with tracepoints readable: run as root
#                                        or with kernel.perf_event_paranoid <= 1)
# Options: ROUNDS=3 DURATION=5 CONNECTIONS=64 FULCRUM_BIN=path
# Output:  a markdown table on stdout.

set -euo pipefail
# shellcheck source=bench/compare.sh
source "$(dirname "${BASH_SOURCE[0]}")/compare.sh"

DURATION=${DURATION:-5}
SYSCALLS=(read write readv writev recvfrom sendto recvmsg sendmsg epoll_wait epoll_pwait
	epoll_ctl futex accept4 ioctl close clock_gettime sched_yield getsockopt setsockopt)

# user_sys_ticks PID: "utime stime" (clock ticks) of PID and every descendant.
user_sys_ticks() {
	local pid=$1 child
	{
		awk '{ sub(/.*\) /, ""); print $12, $13 }' "/proc/$pid/stat" 2>/dev/null || true
		for child in $(pgrep -P "$pid" 2>/dev/null || true); do user_sys_ticks "$child"; done
	} | awk '{ u += $1; s += $2 } END { print u + 0, s + 0 }'
}

# sample PROXY ROUND: one run; appends "proxy round requests user_us sys_us syscalls" to
# $TMP/samples and leaves perf's per-syscall counts in $TMP/PROXY.perf.
sample() {
	local p=$1 round=$2 pid=${PID[$1]} events=raw_syscalls:sys_enter s perf_pid
	for s in "${SYSCALLS[@]}"; do events+=",syscalls:sys_enter_$s"; done
	taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"${WARMUP}s" "$SCHEME://127.0.0.1:${PROXY_PORT[$p]}/" >/dev/null 2>&1
	local u0 s0 u1 s1 n
	read -r u0 s0 < <(user_sys_ticks "$pid")
	perf stat -x, -e "$events" -p "$pid" -o "$TMP/$p.perf" -- sleep $((DURATION + 1)) &
	perf_pid=$!
	taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" "$SCHEME://127.0.0.1:${PROXY_PORT[$p]}/" >"$TMP/$p.wrk" 2>&1 ||
		die "wrk failed against $p: $(tail -n 3 "$TMP/$p.wrk")"
	wait "$perf_pid" || die "perf stat failed against $p (kernel.perf_event_paranoid?)"
	read -r u1 s1 < <(user_sys_ticks "$pid")
	n=$(awk '/requests in/ { print $1 }' "$TMP/$p.wrk")
	awk -F, -v p="$p" -v r="$round" -v n="$n" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$CLK_TCK" '
		$3 == "raw_syscalls:sys_enter" { c = $1 }
		END { printf "%s %d %d %.2f %.2f %.2f\n", p, r, n, u * 1e6 / hz / n, s * 1e6 / hz / n, c / n }
	' "$TMP/$p.perf" >>"$TMP/samples"
	log "$p round $round: $(tail -n 1 "$TMP/samples")"
}

syscalls_main() {
	install_traps
	ensure_tools
	command -v perf >/dev/null 2>&1 || die "perf not found (Debian: linux-perf)"
	build_fulcrum
	start_all
	: >"$TMP/samples"
	local round i n=${#PROXIES[@]} p
	for ((round = 1; round <= ROUNDS; round++)); do
		for ((i = 0; i < n; i++)); do
			sample "${PROXIES[(i + round - 1) % n]}" "$round"
		done
	done
	echo "| proxy | user µs/req | system µs/req | CPU µs/req | syscalls/req | syscalls per request (last round) |"
	echo "| --- | ---: | ---: | ---: | ---: | --- |"
	for p in "${PROXIES[@]}"; do
		local user sys calls detail
		user=$(awk -v p="$p" '$1 == p { print $4 }' "$TMP/samples" | median)
		sys=$(awk -v p="$p" '$1 == p { print $5 }' "$TMP/samples" | median)
		calls=$(awk -v p="$p" '$1 == p { print $6 }' "$TMP/samples" | median)
		n=$(tail -n 1 < <(awk -v p="$p" '$1 == p { print $3 }' "$TMP/samples"))
		detail=$(awk -F, -v n="$n" '$3 ~ /^syscalls:/ && $1 ~ /^[0-9]+$/ && $1 / n >= 0.01 {
			sub(/^syscalls:sys_enter_/, "", $3); printf "%s%s %.2f", sep, $3, $1 / n; sep = ", " }' "$TMP/$p.perf")
		echo "| $p | $user | $sys | $(awk -v a="$user" -v b="$sys" 'BEGIN { printf "%.2f", a + b }') | $calls | $detail |"
	done
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
	syscalls_main "$@"
fi
