#!/usr/bin/env python3
"""Discrete-event model of the `duration-class` scenario's bed, to see what any dispatch
policy can gain over round robin before measuring Fulcrum.

The bed (crates/fulcrum/src/bench/scenario/duration_class.rs): Poisson arrivals, 80 %
short requests of 20 ms and 20 % long ones of 320 ms (the mixed load), 2 backends each
serving 4 requests at once with a FIFO queue beyond. Policies:

- round_robin      requests alternate between the backends' FIFO queues;
- jsq              join the backend with the fewest requests (in service + queued);
- central_fifo     the proxy holds requests while all 8 slots are busy (max_requests 4)
                   and starts them in arrival order;
- central_class    the same, short first, a long request ordered 200 ms (the threshold)
                   after its arrival: Fulcrum's `queue.priority: class`;
- central_strict   strict short-first priority (no offset);
- strict_reserve1  strict priority, and long requests never take the last free slot
                   (one slot kept for short requests: trunk reservation).

Usage: python3 bench/duration_class_model.py [--runs N] [--seconds S]
Prints, for the regimes where round robin's mean is 2x and 3x the floor (the scenario's
utilisations 0.81 and 0.89), each policy's mean response time over the floor and its
improvement over round robin (of the mean over the N runs), then the spread of one run's
improvement: its mean and standard deviation over the N runs, and the share of runs above
seed 000's 43.75 %. `--runs 100 --seconds 30` shows what one 30-s run of the scenario can
be expected to give.
"""

import argparse
import heapq
import random
import statistics

SHORT, LONG = 0.020, 0.320
SHORT_SHARE = 0.8
SLOTS_PER_BACKEND, BACKENDS = 4, 2
THRESHOLD = 0.200
FLOOR = SHORT_SHARE * SHORT + (1 - SHORT_SHARE) * LONG


def arrivals(rate, seconds, seed):
    rnd = random.Random(seed)
    t, out = 0.0, []
    while True:
        t += rnd.expovariate(rate)
        if t >= seconds:
            return out
        out.append((t, SHORT if rnd.random() < SHORT_SHARE else LONG))


def backend_queues(arr, choose):
    """Each backend: 4 slots, FIFO beyond; `choose(i, free_at)` picks the backend."""
    free_at = [[0.0] * SLOTS_PER_BACKEND for _ in range(BACKENDS)]
    ends = [[] for _ in range(BACKENDS)]  # completion times, for queue lengths
    total = 0.0
    for i, (t, s) in enumerate(arr):
        for b in range(BACKENDS):
            while ends[b] and ends[b][0] <= t:
                heapq.heappop(ends[b])
        b = choose(i, ends)
        slots = free_at[b]
        j = min(range(SLOTS_PER_BACKEND), key=lambda k: slots[k])
        start = max(slots[j], t)
        slots[j] = start + s
        heapq.heappush(ends[b], start + s)
        total += start + s - t
    return total / len(arr)


def central(arr, offset, reserve=0):
    """A proxy-side queue over all 8 slots; `offset` = None for FIFO."""
    capacity = SLOTS_PER_BACKEND * BACKENDS
    busy = longs = 0
    done, waiting, total, seq = [], [], 0.0, 0

    def key(t, s):
        if offset is None:
            return t
        return t + (offset if s == LONG else 0.0)

    def start_some(now):
        nonlocal busy, longs, total
        while waiting and busy < capacity:
            # The first waiter that may start (long ones may not take reserved slots).
            pick = None
            for idx, (_, _, a, s) in enumerate(sorted(waiting)):
                if s == LONG and longs >= capacity - reserve:
                    continue
                pick = (idx, a, s)
                break
            if pick is None:
                return
            entry = sorted(waiting)[pick[0]]
            waiting.remove(entry)
            heapq.heapify(waiting)
            _, _, a, s = entry
            busy += 1
            longs += s == LONG
            heapq.heappush(done, (now + s, s))
            total += now + s - a

    for t, s in arr:
        while done and done[0][0] <= t:
            end, ds = heapq.heappop(done)
            busy -= 1
            longs -= ds == LONG
            start_some(end)
        heapq.heappush(waiting, (key(t, s), seq, t, s))
        seq += 1
        start_some(t)
    while done or waiting:
        end, ds = heapq.heappop(done)
        busy -= 1
        longs -= ds == LONG
        start_some(end)
    return total / len(arr)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=600.0)
    args = parser.parse_args()
    policies = {
        "round_robin": lambda a: backend_queues(a, lambda i, ends: i % BACKENDS),
        "jsq": lambda a: backend_queues(
            a, lambda i, ends: min(range(BACKENDS), key=lambda b: (len(ends[b]), b))
        ),
        "central_fifo": lambda a: central(a, None),
        "central_class": lambda a: central(a, THRESHOLD),
        "central_strict": lambda a: central(a, 1e9),
        "strict_reserve1": lambda a: central(a, 1e9, reserve=1),
    }
    for label, utilisation in (("2x", 0.81), ("3x", 0.89)):
        rate = utilisation * SLOTS_PER_BACKEND * BACKENDS / FLOOR
        means = {name: 0.0 for name in policies}
        per_run = {name: [] for name in policies}
        for run in range(args.runs):
            arr = arrivals(rate, args.seconds, 1000 + run)
            run_means = {name: policy(arr) for name, policy in policies.items()}
            for name, mean in run_means.items():
                means[name] += mean / args.runs
                rr_run = run_means["round_robin"]
                per_run[name].append(100 * (rr_run - mean) / rr_run)
        rr = means["round_robin"]
        print(f"regime {label} (utilisation {utilisation}, {rate:.1f} req/s):")
        for name, mean in means.items():
            runs = per_run[name]
            spread = statistics.stdev(runs) if len(runs) > 1 else 0.0
            above = sum(r > 43.75 for r in runs) / len(runs)
            print(
                f"  {name:16} mean {mean * 1000:7.1f} ms  x floor {mean / FLOOR:5.2f}"
                f"  vs round_robin {100 * (rr - mean) / rr:+6.1f} %"
                f"  one run {statistics.mean(runs):+6.1f} ± {spread:4.1f} %"
                f"  above 43.75 %: {100 * above:3.0f} % of runs"
            )


if __name__ == "__main__":
    main()
