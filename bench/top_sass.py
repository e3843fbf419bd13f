"""The SASS instructions with the most warp-stall samples in an ncu source-page CSV, for a quick read
of where a kernel waits (bench/profile_routing.py's docstring shows how to make the CSV):

    ncu -i prof.ncu-rep --page source --csv --print-source sass > src.csv
    python bench/top_sass.py src.csv
"""
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
hi = next(i for i, r in enumerate(rows) if any("Source" == c for c in r))
h = rows[hi]
src = h.index("Source")
cand = [i for i, c in enumerate(h) if "Warp Stall Sampling (All" in c]
col = cand[0] if cand else None
print("columns:", [c for c in h if "Stall" in c][:6])
data = []
for r in rows[hi + 1:]:
    if len(r) <= max(src, col or 0): continue
    try: v = float(r[col].replace(",", ""))
    except ValueError: continue
    data.append((v, r[0] if h[0] else "", r[src]))
tot = sum(d[0] for d in data) or 1
print("total samples", tot, "instructions", len(data))
for v, a, s in sorted(data, reverse=True)[:25]:
    print(f"{100*v/tot:5.1f}% {a} {s[:110]}")
