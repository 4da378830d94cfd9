#!/usr/bin/env bash
# bench/instructions.sh: user-space instructions per proxied request, under callgrind.
#
# Timing is too noisy on a shared VM to judge small hot-path changes; callgrind counts
# instructions, repeatably. Fulcrum (one worker) runs under `valgrind --tool=callgrind`
# in front of compare.sh's upstream nginx; wrk -t1 -c16 loads it for SHORT seconds in one
# run and LONG seconds in another, and
#   instructions/request = (Ir(LONG) − Ir(SHORT)) / (requests(LONG) − requests(SHORT)),
# so start-up and shutdown cancel out.
#
# Usage:   bash bench/instructions.sh            (binary: BIN=target/release/fulcrum)
# Options: SHORT=4 LONG=12 BIN=path/to/fulcrum
# Output:  the figure on stdout; the callgrind files of both runs in
#          bench/results/instructions-<timestamp>/ (git-ignored), for
#          `callgrind_annotate --inclusive=no bench/results/instructions-*/long.out`.

set -euo pipefail
# shellcheck source=bench/compare.sh
source "$(dirname "${BASH_SOURCE[0]}")/compare.sh"

SHORT=${SHORT:-4}
LONG=${LONG:-12}
BIN=${BIN:-$FULCRUM_BIN}

# One run under callgrind with $1 s of load; prints "<instructions> <requests>".
callgrind_run() {
	local secs=$1 out=$2 pid i
	valgrind --tool=callgrind --callgrind-out-file="$out" \
		"$BIN" run --config "$TMP/fulcrum/fulcrum.yaml" --threads 1 \
		>"$TMP/fulcrum/stdout.log" 2>"$TMP/fulcrum/stderr.log" &
	pid=$!
	for ((i = 0; i < 300; i++)); do
		grep -q '"event":"ready"' "$TMP/fulcrum/stdout.log" 2>/dev/null && break
		kill -0 "$pid" 2>/dev/null || die "fulcrum exited under callgrind"
		sleep 0.1
	done
	wrk -t1 -c16 -d"${secs}"s "http://127.0.0.1:${PROXY_PORT[fulcrum]}/" >"$TMP/wrk-$secs.txt" 2>&1 ||
		die "wrk failed: $(tail -n 3 "$TMP/wrk-$secs.txt")"
	kill -TERM "$pid"
	for ((i = 0; i < 300; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	kill -9 "$pid" 2>/dev/null || true
	echo "$(awk '/^summary:/ { print $2 }' "$out") $(awk '/requests in/ { print $1 }' "$TMP/wrk-$secs.txt")"
}

instructions_main() {
	install_traps
	ensure_tools
	command -v valgrind >/dev/null 2>&1 || die "valgrind not found (Debian: valgrind)"
	[[ -x "$BIN" ]] || die "no fulcrum binary at $BIN (cargo build --release -p fulcrum)"
	check_ports_free
	setup_tmp
	start_upstream
	write_fulcrum_conf
	local dir short long
	dir="$REPO/bench/results/instructions-$(date +%Y%m%d-%H%M%S)"
	mkdir -p "$dir"
	short=$(callgrind_run "$SHORT" "$dir/short.out")
	long=$(callgrind_run "$LONG" "$dir/long.out")
	log "short run: $short; long run: $long (instructions, requests)"
	read -r i1 r1 <<<"$short"
	read -r i2 r2 <<<"$long"
	awk -v a="$i1" -v b="$r1" -v c="$i2" -v d="$r2" -v bin="$BIN" \
		'BEGIN { printf "instructions/request: %.0f (%s)\n", (c - a) / (d - b), bin }'
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
	instructions_main "$@"
fi
