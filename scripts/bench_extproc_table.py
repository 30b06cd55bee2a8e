"""Markdown table for scripts/bench_extproc.sh: one row per setup and body size."""
import json
import sys

path, connections, sse_chunks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = [json.loads(line) for line in open(path)]
by = {(r["setup"], r["kind"], r["size"], r["sse"]): r for r in rows}
setups = list(dict.fromkeys(r["setup"] for r in rows))
sizes = sorted({r["size"] for r in rows if r["kind"] == "throughput"})


def size_label(n):
    return f"{n // 1048576} MB" if n >= 1048576 else f"{n // 1024} KB"


def cpu_per(r, per, field="cpu_s"):
    if not r or r["requests"] == 0 or not r.get(field):
        return "–"
    return f"{r[field] * 1e6 / (r['requests'] * per):.0f}"


def alloc_per(r, per):
    if not r or not r.get("alloc_bytes") or r["requests"] == 0:
        return "–"
    return f"{r['alloc_bytes'] / (r['requests'] * per) / 1024:.1f} KiB"


print(f"Closed loop, {connections} connections (req/s, picker CPU); one connection for the path "
      "time (first request byte sent → request head at the upstream).\n")
print("| setup | body | req/s | path p50 µs | path p99 µs | picker CPU µs/req | Envoy CPU µs/req | CPU µs/req, 1 conn | epp alloc/req |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for size in sizes:
    for s in setups:
        t = by.get((s, "throughput", size, 0))
        lat = by.get((s, "latency", size, 0))
        a = by.get((s, "alloc", size, 0))
        if not t:
            continue
        print(f"| {s} | {size_label(size)} | {t['rps']:.0f} | {lat['path_p50_us'] if lat else '–'} "
              f"| {lat['path_p99_us'] if lat else '–'} | {cpu_per(t, 1)} "
              f"| {cpu_per(t, 1, 'envoy_cpu_s')} | {cpu_per(lat, 1)} "
              f"| {alloc_per(a, 1)} |")
print(f"\nStreamed responses ({sse_chunks} SSE events + usage + [DONE] per request, each written "
      "on its own; Envoy coalesces some): per ext_proc message (Envoy's stream_msgs_sent).\n")
print("Allocated bytes and allocations per chunk: the SSE request's beyond a 1 KB request's, "
      "divided by its extra messages (the response chunks).\n")
print("| setup | req/s | ext_proc msgs/req | picker CPU µs/msg | epp alloc/chunk | epp allocations/chunk |")
print("|---|---:|---:|---:|---:|---:|")


def per_msg(r, value):
    if not r or not r.get("ext_proc_msgs"):
        return "–"
    return value / r["ext_proc_msgs"]


def per_chunk(sse, plain, key):
    """`key` (allocations, alloc_bytes) per response chunk: the SSE request's beyond the
    plain one's, over its extra messages."""
    if not sse or not plain or sse.get(key) is None or plain.get(key) is None:
        return "–"
    extra_msgs = sse["ext_proc_msgs"] / sse["requests"] - plain["ext_proc_msgs"] / plain["requests"]
    extra = sse[key] / sse["requests"] - plain[key] / plain["requests"]
    return extra / extra_msgs if extra_msgs > 0 else "–"


for s in setups:
    t = next((r for r in rows if r["setup"] == s and r["kind"] == "sse"), None)
    a = next((r for r in rows if r["setup"] == s and r["kind"] == "alloc" and r["sse"]), None)
    if not t:
        continue
    cpu = per_msg(t, t["cpu_s"] * 1e6)
    plain = next((r for r in rows if r["setup"] == s and r["kind"] == "alloc"
                  and r["size"] == 1024 and not r["sse"]), None)
    alloc = per_chunk(a, plain, "alloc_bytes")
    count = per_chunk(a, plain, "allocations")
    print(f"| {s} | {t['rps']:.0f} | {t['ext_proc_msgs'] / max(t['requests'], 1):.0f} "
          f"| {cpu if cpu == '–' or t['cpu_s'] == 0 else f'{cpu:.1f}'} "
          f"| {alloc if alloc == '–' else f'{alloc:.0f} B'} "
          f"| {count if count == '–' else f'{count:.2f}'} |")

mem = next((r for r in rows if r["kind"] == "memory"), None)
if mem:
    print(f"\nMemory: epp idle RSS {mem['idle_rss_kib'] / 1024:.1f} MiB; 1M-token (4 MB) prompts at "
          f"10 QPS over 10 endpoints for {mem['seconds']:.0f} s ({mem['requests']} requests, "
          f"{mem['errors']} errors): peak RSS {mem['peak_rss_kib'] / 1024:.1f} MiB, "
          f"RSS at the end {mem['end_rss_kib'] / 1024:.1f} MiB.")
