#!/usr/bin/env python3
"""Instructions per iteration of criterion benchmarks, counted by callgrind.

Wall-clock figures on a shared machine move by tens of percent from run to run; instruction
counts do not. Every timed routine in benches/*.rs runs inside `common::measured`, so the
instructions of one iteration are the inclusive cost of `measured` divided by its calls.

Usage (after `cargo bench --no-run`):
    python3 benches/callgrind.py media rtp_tick/calls/3000 bridge_relay/pcma_to_pcma ...
    python3 benches/callgrind.py sip sip/parse/invite_sdp_sipp
Each id is run alone (criterion `--exact`, `--profile-time 1`) under
`valgrind --tool=callgrind --toggle-collect=*common::measured*`; the raw callgrind files are
left in target/callgrind/.
"""

import glob
import os
import re
import subprocess
import sys


def bench_binary(name):
    candidates = [
        p
        for p in glob.glob(f"target/release/deps/{name}-*")
        if os.access(p, os.X_OK) and not p.endswith(".d")
    ]
    if not candidates:
        sys.exit(f"no bench binary for {name}: run `cargo bench --bench {name} --no-run`")
    return max(candidates, key=os.path.getmtime)


def measured_cost(path):
    """(calls, inclusive Ir) of every call to a function named *common::measured*."""
    names, fn_name = {}, None
    calls = cost = 0
    expect_cost = False
    with open(path) as f:
        for line in f:
            if expect_cost:
                cost += int(line.split()[1])
                expect_cost = False
                continue
            m = re.match(r"(c?fn)=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
            if m:
                if m.group(3):
                    names[m.group(2)] = m.group(3)
                if m.group(1) == "cfn":
                    fn_name = names.get(m.group(2), "")
                continue
            if line.startswith("calls=") and fn_name and "common::measured" in fn_name:
                calls += int(line.split("=")[1].split()[0])
                expect_cost = True
    return calls, cost


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    binary = bench_binary(sys.argv[1])
    os.makedirs("target/callgrind", exist_ok=True)
    for bench_id in sys.argv[2:]:
        out = "target/callgrind/" + bench_id.replace("/", "_") + ".out"
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--toggle-collect=*common::measured*",
                f"--callgrind-out-file={out}",
                binary,
                "--bench",
                bench_id,
                "--exact",
                "--warm-up-time",
                "1",
                "--profile-time",
                "1",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        calls, cost = measured_cost(out)
        if calls == 0:
            print(f"{bench_id:55} no iterations (is the id exact?)")
            continue
        print(f"{bench_id:55} {cost / calls:12.0f} Ir/iter  ({calls} iterations)")


if __name__ == "__main__":
    main()
