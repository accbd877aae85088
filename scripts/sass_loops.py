"""Opcode histogram of a cubin and of each loop body in it (device-side SASS analysis).

    python3 scripts/sass_loops.py FILE.cubin
"""
import collections
import re
import subprocess
import sys

sass = subprocess.run(["cuobjdump", "-sass", sys.argv[1]], capture_output=True, text=True).stdout
ins = []
for line in sass.splitlines():
    m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
    if m:
        ins.append((int(m.group(1), 16), m.group(2)))


def op(t):
    return re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0]


print("total", len(ins), collections.Counter(op(t) for _, t in ins).most_common(10))
for a, t in ins:
    m = re.search(r"BRA (0x[0-9a-f]+)", t)
    if m and int(m.group(1), 16) < a:
        start = int(m.group(1), 16)
        body = [x for x in ins if start <= x[0] <= a]
        print(f"loop {start:#x}-{a:#x}: {len(body)}", collections.Counter(op(x[1]) for x in body).most_common(10))
