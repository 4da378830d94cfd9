#!/usr/bin/env bash
# bench/profile.sh: CPU profile of fulcrum under the load of bench/compare.sh.
#
# Same upstreams, same fulcrum config, same pinning (fulcrum on CPU 0, wrk and upstream on
# CPU 1) and same wrk load as compare.sh, which it sources for its setup and cleanup.
# perf samples cpu-clock (this VM exposes no hardware counters) with DWARF call graphs
# (the release profile keeps line tables but no frame pointers). perf itself runs on CPU 1
# so it does not take CPU time from the process it measures.
#
# Usage:   bash bench/profile.sh
# Options: PROFILE_SECONDS=10 FREQ=499 STACK_BYTES=8192 CONNECTIONS=64 THREADS_WRK=1
# Output:  bench/results/profile-<timestamp>.{perf.data,self.txt,children.txt,svg}
#          (the .svg only if inferno-collapse-perf and inferno-flamegraph are installed:
#          `cargo install inferno`).

set -euo pipefail
# shellcheck source=bench/compare.sh
source "$(dirname "${BASH_SOURCE[0]}")/compare.sh"

PROFILE_SECONDS=${PROFILE_SECONDS:-10}
FREQ=${FREQ:-499}
STACK_BYTES=${STACK_BYTES:-8192} # user stack copied per sample for DWARF unwinding

profile_main() {
	install_traps
	ensure_tools
	command -v perf >/dev/null 2>&1 || die "perf not found (Debian: linux-perf)"
	build_fulcrum
	check_ports_free
	setup_tmp
	start_upstream
	start_fulcrum
	check_rr fulcrum "${PROXY_PORT[fulcrum]}"

	mkdir -p "$REPO/bench/results"
	local out
	out="$REPO/bench/results/profile-$(date +%Y%m%d-%H%M%S)"
	wrk_run "$WARMUP" "$CONNECTIONS" "$THREADS_WRK" "${PROXY_PORT[fulcrum]}" "$TMP/warmup.txt"

	# The load runs 2 s longer on each side than the recording, so only steady state is
	# sampled.
	taskset -c "$LOAD_CPU" wrk -t"$THREADS_WRK" -c"$CONNECTIONS" -d"$((PROFILE_SECONDS + 4))"s --latency \
		"http://127.0.0.1:${PROXY_PORT[fulcrum]}/" >"$out.wrk.txt" 2>&1 &
	WRK_PID=$!
	sleep 2
	log "perf record: ${PROFILE_SECONDS}s of fulcrum (pid ${PID[fulcrum]}) at ${FREQ} Hz"
	local c0 c1 t0 t1
	c0=$(proc_ticks "${PID[fulcrum]}")
	t0=$EPOCHREALTIME
	taskset -c "$LOAD_CPU" perf record -q -e cpu-clock -F "$FREQ" --call-graph "dwarf,$STACK_BYTES" \
		-p "${PID[fulcrum]}" -o "$out.perf.data" -- sleep "$PROFILE_SECONDS"
	t1=$EPOCHREALTIME
	c1=$(proc_ticks "${PID[fulcrum]}")
	# Below ~0.95 the load side (CPU 1, now also running perf) was the bottleneck and the
	# profile shows an unsaturated proxy.
	log "fulcrum CPU share while recording: $(awk -v a="$c0" -v b="$c1" -v t0="$t0" -v t1="$t1" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", (b - a) / hz / (t1 - t0) }')"
	wait "$WRK_PID"
	WRK_PID=""
	log "wrk during the profile: $(grep 'Requests/sec' "$out.wrk.txt")"

	# --no-inline: resolving inlined frames through addr2line makes perf report very
	# slow; the symbols are those of real (non-inlined) functions.
	log "perf report (self, children)"
	perf report -i "$out.perf.data" --stdio --no-inline --no-children --sort symbol -g none \
		--percent-limit 0.2 >"$out.self.txt" 2>/dev/null
	perf report -i "$out.perf.data" --stdio --no-inline --children --sort symbol -g none \
		--percent-limit 0.5 >"$out.children.txt" 2>/dev/null
	if command -v inferno-collapse-perf >/dev/null 2>&1 && command -v inferno-flamegraph >/dev/null 2>&1; then
		perf script -i "$out.perf.data" --no-inline 2>/dev/null | inferno-collapse-perf |
			inferno-flamegraph --title "fulcrum, wrk -c$CONNECTIONS, ${PROFILE_SECONDS}s" >"$out.svg"
		log "flamegraph: $out.svg"
	fi
	log "profile: $out.{self,children}.txt"
}

profile_main "$@"
