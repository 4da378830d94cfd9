#!/usr/bin/env bash
# bench/ab.sh: interleaved A/B of two fulcrum binaries as round-robin proxies.
#
# Uses compare.sh's setup (the same upstream nginx on CPU 1, wrk on CPU 1, the proxy
# under test pinned to CPU 0) with two fulcrum processes instead of nginx and HAProxy.
# Each round measures both, alternating which goes first, so a shared machine's drift
# hits both alike; the medians over rounds are printed, then every run's row.
#
# Usage:   bash bench/ab.sh NEW_BINARY BASE_BINARY
# Options: ROUNDS=6 DURATION=10 CONNECTIONS=64 WARMUP=2 (as compare.sh)
# Output:  "new|base median req/CPU-s R rps R p99 ms P" and the per-run rows
#          (round proxy rps p50 p99 cpu_share req_per_cpu_s requests non2xx errors ...).

set -euo pipefail
(($# == 2)) || {
	echo "usage: bash bench/ab.sh NEW_BINARY BASE_BINARY" >&2
	exit 2
}
AB_ROUNDS=${ROUNDS:-6}
# shellcheck source=bench/compare.sh
source "$(dirname "${BASH_SOURCE[0]}")/compare.sh"
ROUNDS=$AB_ROUNDS
install_traps
ensure_tools
declare -A BINS=([new]=$1 [base]=$2)
for p in new base; do [[ -x "${BINS[$p]}" ]] || die "${BINS[$p]} is not an executable"; done
PROXIES=(new base)
PROXY_PORT=([fulcrum]=18080 [new]=18080 [base]=18090)
check_ports_free
setup_tmp
start_upstream
write_fulcrum_conf
for p in new base; do
	sed "s/127.0.0.1:18080/127.0.0.1:${PROXY_PORT[$p]}/" "$TMP/fulcrum/fulcrum.yaml" >"$TMP/fulcrum/$p.yaml"
	taskset -c "$PROXY_CPU" "${BINS[$p]}" run --config "$TMP/fulcrum/$p.yaml" --threads 1 \
		>"$TMP/fulcrum/$p.out" 2>"$TMP/fulcrum/$p.err" &
	PID[$p]=$!
	STARTED+=("$!")
	wait_port "$p" "${PROXY_PORT[$p]}"
done
RAW=$TMP/raw.txt
RUNS=$TMP/runs.txt
: >"$RUNS"
for ((round = 1; round <= ROUNDS; round++)); do
	if ((round % 2)); then
		measure new "$round"
		measure base "$round"
	else
		measure base "$round"
		measure new "$round"
	fi
done
for p in new base; do
	echo "$p median req/CPU-s $(col_median 7 "$p" "$RUNS") rps $(col_median 3 "$p" "$RUNS") p99 ms $(col_median 5 "$p" "$RUNS")"
done
cat "$RUNS"
