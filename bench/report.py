"""Tables (markdown, printed and written beside the JSON) and the log-log plot of a run."""

from __future__ import annotations

import json
import os
import sys

SHORT = {
    "official-eager": "official-eager",
    "m2po_ops[torch]/official": "m2po[torch] off.",
    "m2po_ops[triton]/official": "m2po[triton] off.",
    "m2po_ops[triton]+graph/official": "m2po[triton+graph] off.",
    "sorted-eager": "sorted-eager",
    "compiled": "compiled",
    "m2po_ops[torch]/paper": "m2po[torch] paper",
    "m2po_ops[triton]/paper": "m2po[triton] paper",
    "m2po_ops[triton]+graph/paper": "m2po[triton+graph] paper",
}
ORDER = list(SHORT)


def _is_library(name: str) -> bool:
    return name.startswith("m2po_ops")


def add_ratios(results: list) -> None:
    """ratio = competitor median / fastest ok library path of the same variant on the same input."""
    best = {}
    for r in results:
        if _is_library(r["competitor"]) and r.get("status") == "ok":
            key = (r["n_tokens"], r["dtype"], r["regime"], r["variant"])
            if key not in best or r["median_ms"] < best[key][0]:
                best[key] = (r["median_ms"], r["competitor"])
    for r in results:
        key = (r["n_tokens"], r["dtype"], r["regime"], r["variant"])
        if key not in best:
            continue
        ms, name = best[key]
        r["ratio_vs"] = name
        if r.get("status") == "ok":
            r["ratio"] = r["median_ms"] / ms
        elif r.get("status") == "timeout":
            r["ratio_lower_bound"] = r["lower_bound_ms"] / ms
            if r.get("estimated_ms"):
                r["ratio_estimated"] = r["estimated_ms"] / ms


def _ms(x: float) -> str:
    if x >= 1000:
        return f"{x / 1000:.2f} s"
    if x >= 100:
        return f"{x:.0f} ms"
    if x >= 10:
        return f"{x:.1f} ms"
    if x >= 1:
        return f"{x:.2f} ms"
    return f"{x * 1000:.0f} us"


def _size(n: int) -> str:
    if n >= 2**20:
        return f"{n // 2**20}M"
    return f"{n // 2**10}K"


def _time_cell(r) -> str:
    st = r.get("status")
    if st == "ok":
        cell = _ms(r["median_ms"])
        if r.get("reps", 0) >= 3 and r["median_ms"] > 0:
            cell += f" ±{50 * (r['p90_ms'] - r['p10_ms']) / r['median_ms']:.0f}%"
        if not _is_library(r["competitor"]) and "ratio" in r:
            cell += f" ({r['ratio']:.1f}x)"
        return cell
    if st == "timeout":
        cell = f"timeout >{r.get('budget_s', 0):g}s"
        if "ratio_estimated" in r:
            cell += f" (est. {_ms(r['estimated_ms'])}, ~{r['ratio_estimated']:.0f}x)"
        return cell
    if st == "wrong":
        return "WRONG mask"
    if st == "skipped":
        return "skip (timeout)"
    if st == "error":
        return "error"
    return st or "?"


def _cost_cell(r, cuda: bool) -> str:
    if r.get("syncs") is None:
        return "-"
    s = f"{r['syncs']}" + ("+" if r.get("syncs_lower_bound") else "")
    if not cuda:
        return s
    parts = [s]
    la = r.get("launches")
    parts.append(f"{la['kernels'] + la['memcpy'] + la['memset']}" if la else "-")
    parts.append(f"{r['peak_extra_mb']:.0f}MB" if r.get("peak_extra_mb") is not None else "-")
    parts.append(f"{100 * r['bandwidth_fraction']:.0f}%" if r.get("bandwidth_fraction") is not None else "-")
    return " / ".join(parts)


def _table(headers, rows) -> str:
    widths = [max(len(str(h)), *(len(str(row[i])) for row in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def tables(data: dict) -> str:
    cuda = data["machine"]["device"] == "cuda"
    names = [n for n in ORDER if any(c["name"] == n for c in data["competitors"])]
    by = {(r["competitor"], r["n_tokens"], r["dtype"], r["regime"]): r for r in data["results"]}
    head = ["tokens", "dtype", "regime", "masked p/o", "tail"]
    rows_t, rows_c = [], []
    for inp in data["inputs"]:
        key = (inp["n_tokens"], inp["dtype"], inp["regime"])
        mf = inp["masked_fraction"]
        base = [_size(inp["n_tokens"]), inp["dtype"].replace("float", "fp").replace("bfloat", "bf"), inp["regime"],
                f"{100 * mf['paper']:.2f}/{100 * mf['official']:.2f}%",
                f"{100 * inp['tail_fraction']:.1f}%" if inp.get("tail_fraction") is not None else "-"]
        rows_t.append(base + [_time_cell(by.get((n, *key), {})) for n in names])
        floor = [_ms(inp["floor_us"] / 1e3)] if cuda and inp.get("floor_us") else (["-"] if cuda else [])
        rows_c.append(base + floor + [_cost_cell(by.get((n, *key), {}), cuda) for n in names])
    v = data["versions"]
    m = data["machine"]
    dev = (f"{v['gpu_name']} (CUDA {v['cuda']})" if cuda else
           f"CPU: {m['cpu']}, {m['cpu_count']} cores, {m['torch_threads']} torch thread(s), "
           f"load average {m.get('loadavg_at_start', ['?'])[0]} at start" + _cell_loads(data))
    out = [
        f"### m2po-ops benchmark: {dev}; torch {v['torch']}, triton {v['triton']}"
        + (" (quick run)" if data.get("quick") else ""),
        "",
        "Time per forward+backward call: median ±half the p10-p90 spread in % of it; (Nx) = that competitor's time / the fastest m2po_ops path "
        "of the same rule on the same input. masked p/o: the reference's masked fraction, paper / official "
        "rule (official: tokens whose gradient the clip cuts). tail: the fraction of the paper rule's trust region "
        "with m2 > tau (what the solver orders). The competitors of one input are timed in rounds (one call "
        "of each per round, the order rotating so each follows every other equally often), at least 7 rounds.",
        "",
        _table(head + [SHORT[n] for n in names], rows_t),
        "",
        ("Per call: host syncs / kernel launches (kernels+memcpy+memset; graph: kernels in the replayed "
         "graph) / peak extra memory / achieved fraction of the copy floor (a device-to-device copy of the "
         "call's minimum bytes, measured in this run; its time is the 'copy floor' column)." if cuda else
         "Host syncs per call (counted by instrumenting every PyTorch entry point that makes the host wait: "
         ".item, .tolist, bool/int/float(t), nonzero, boolean-mask indexing, .cpu...; on a GPU each is a "
         "round trip). '+' = lower bound (the call timed out). Launches, memory and bandwidth: CUDA only."),
        "",
        _table(head + (["copy floor"] if cuda else []) + [SHORT[n] for n in names], rows_c),
        "",
    ]
    summary = _summary(data, names)
    if summary:
        out += [
            "Summary per regime over all sizes and dtypes: median of (Nx) (>1: m2po_ops is faster; '>=' with "
            "timeouts counted at their lower bound), and host syncs per call (min-max).",
            "",
            summary,
            "",
        ]
    notes = []
    for nt in data.get("not_timed", []):
        notes.append(f"- {nt['competitor']}: not timed ({nt['reason']}).")
    if data["config"].get("sizes_note"):
        notes.append(f"- {data['config']['sizes_note']}.")
    comp = [r for r in data["results"] if r.get("compile_s") is not None]
    if comp:
        notes.append(f"- compiled: first-call compile time {max(r['compile_s'] for r in comp):.1f} s at most "
                     "(per input: see JSON; inductor's on-disk cache as found"
                     + ("" if cuda else ": a cold cache took ~33 s on a 2-core CPU") + "), not included in its times.")
    graph = [r for r in data["results"] if "+graph" in r["competitor"] and r.get("status") == "error"]
    if graph:
        notes.append(f"- CUDA graph capture failed on {len(graph)} input(s): {graph[0].get('error', '')[:200]}")
    errors = [r for r in data["results"] if r.get("status") == "error" and "+graph" not in r["competitor"]]
    for r in errors[:3]:
        notes.append(f"- {r['competitor']} error at {_size(r['n_tokens'])} {r['dtype']} {r['regime']}: "
                     f"{r.get('error', '')[:200]}")
    notes.append(f"- official-eager's Python loop has a per-call budget of {data['config']['official_budget_s']:g} s; "
                 "'est.' extrapolates the loop linearly and is not a measurement.")
    notes.append("- Every competitor's keep mask was compared bit for bit with the reference "
                 "(m2po_mask, same rule); a mismatch would read 'WRONG mask' and is not timed.")
    out += ["Notes:", *notes]
    return "\n".join(out)


def _cell_loads(data: dict) -> str:
    """', 1-min load average per cell X-Y' from each input's loadavg_before / loadavg_after."""
    loads = [inp[k][0] for inp in data.get("inputs", []) for k in ("loadavg_before", "loadavg_after") if inp.get(k)]
    return f", per cell {min(loads):.2f}-{max(loads):.2f} (before/after each)" if loads else ""


def host_path_line(data: dict) -> str:
    """The fused backend's host path (bench/host_path.py), one line."""
    h = data.get("host_path")
    if not h:
        return ""
    if h.get("error"):
        return f"host path of the fused backend: not measured ({h['error'][:200]})"
    return (f"host path of the fused backend ({h['n_tokens']} tokens, {h['dtype']}, kernels stubbed, forward+backward, "
            f"median of {h['calls']} calls): {h['fused_us']:.0f} us, plain eager GRPO loss {h['eager_us']:.0f} us: "
            f"{h['ratio']:.2f}x (goal <= 0.6x)"
            + (f"; an empty autograd.Function alone: {h['function_floor_us']:.0f} us ({h['function_floor_ratio']:.2f}x)"
               if "function_floor_us" in h else ""))


def _summary(data: dict, names: list) -> str:
    import statistics

    regimes = list(data["config"]["regimes"])
    rows = []
    for name in names:
        if _is_library(name):
            continue
        cells = [SHORT[name]]
        for rg in regimes:
            rs = [r for r in data["results"] if r["competitor"] == name and r["regime"] == rg]
            ratios = [r["ratio"] for r in rs if "ratio" in r]
            lower = [r["ratio_lower_bound"] for r in rs if "ratio_lower_bound" in r]
            n_skip = sum(r.get("status") == "skipped" for r in rs)
            sy = [r["syncs"] for r in rs if r.get("syncs") is not None]
            if not ratios and not lower:
                cells.append("-")
                continue
            med = statistics.median(ratios + lower)
            cell = ("≥" if lower else "") + f"{med:.2f}x"
            if lower or n_skip:
                cell += f" ({len(lower) + n_skip} timeout/skip)"
            if sy:
                cell += f"; syncs {min(sy)}-{max(sy)}" + ("+" if lower else "")
            cells.append(cell)
        rows.append(cells)
    if not rows:
        return ""
    return _table(["competitor"] + regimes, rows)


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = data["config"]["dtypes"]
    regimes = list(data["config"]["regimes"])
    names = [n for n in ORDER if any(c["name"] == n for c in data["competitors"])]
    fig, axes = plt.subplots(len(dtypes), len(regimes), figsize=(4.6 * len(regimes), 3.8 * len(dtypes)),
                             squeeze=False, sharex=True, sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, dt in enumerate(dtypes):
        for j, rg in enumerate(regimes):
            ax = axes[i][j]
            for k, name in enumerate(names):
                pts = sorted((r["n_tokens"], r["median_ms"]) for r in data["results"]
                             if r["competitor"] == name and r["dtype"] == dt and r["regime"] == rg
                             and r.get("status") == "ok")
                style = "--" if name.endswith("official") or name == "official-eager" else "-"
                marker = "o" if _is_library(name) else "s"
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=marker, ms=4,
                            color=colors[k % len(colors)], label=name)
                tos = [(r["n_tokens"], r["lower_bound_ms"]) for r in data["results"]
                       if r["competitor"] == name and r["dtype"] == dt and r["regime"] == rg
                       and r.get("status") == "timeout"]
                if tos:
                    ax.plot([p[0] for p in tos], [p[1] for p in tos], marker="^", ls="none", ms=7,
                            color=colors[k % len(colors)], label=f"{name} timeout (lower bound)")
            ax.set_xscale("log", base=2)
            sizes = data["config"]["sizes"]
            ax.set_xticks(sizes)
            ax.set_xticklabels([_size(n) for n in sizes])
            ax.xaxis.set_minor_locator(__import__('matplotlib').ticker.NullLocator())
            ax.set_yscale("log")
            ax.set_title(f"{rg}, {dt}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if i == len(dtypes) - 1:
                ax.set_xlabel("tokens (padded batch)")
            if j == 0:
                ax.set_ylabel("ms per forward+backward")
    handles, labels = {}, []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    v = data["versions"]
    dev = v["gpu_name"] or f"CPU ({data['machine']['cpu_count']} cores)"
    fig.suptitle(f"M2PO loss, forward+backward: {dev}, torch {v['torch']}", fontsize=11)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=min(4, len(handles)),
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.025 * ((len(handles) - 1) // 4), 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdict(data: dict) -> str:
    """One line: which competitor is faster or slower than m2po_ops, at which sizes (the median
    ratio over regimes and dtypes at each size; ratio = competitor time / m2po_ops time)."""
    import statistics

    per = {}
    for r in data["results"]:
        if _is_library(r["competitor"]) or r.get("ratio") is None or r.get("status") != "ok":
            continue
        per.setdefault(r["competitor"], {}).setdefault(r["n_tokens"], []).append(r["ratio"])
    parts = []
    for name, by_size in sorted(per.items()):
        med = {n: statistics.median(v) for n, v in sorted(by_size.items())}
        faster = [n for n, x in med.items() if x > 1]  # the competitor takes longer: m2po_ops faster
        slower = [n for n, x in med.items() if x < 1]
        lo, hi = min(med.values()), max(med.values())
        if not slower:
            parts.append(f"faster than {name} at every size ({lo:.2g}x-{hi:.2g}x)")
        elif not faster:
            parts.append(f"slower than {name} at every size ({lo:.2g}x-{hi:.2g}x)")
        else:
            parts.append(f"faster than {name} at {', '.join(_size(n) for n in faster)} and slower at "
                         f"{', '.join(_size(n) for n in slower)} ({lo:.2g}x-{hi:.2g}x)")
    target = _target_line(data)
    if not parts:
        return "verdict: no ratio to report (m2po_ops and at least one competitor must be timed on the same inputs)" + target
    return f"verdict ({data.get('machine', {}).get('device', '?')}): m2po_ops is " + "; ".join(parts) + \
        " (x = competitor time / m2po_ops time, median over regimes and dtypes)" + target


TARGET_SPEEDUP, TARGET_FROM = 3.0, 262144


def _target_line(data: dict) -> str:
    """Whether m2po_ops[torch]/paper is >= 3x sorted-eager at every size >= 256K in every regime
    and dtype, and never slower at the smaller sizes (each cell's ratio)."""
    ok = {(r["competitor"], r["n_tokens"], r["dtype"], r["regime"]): r["median_ms"] for r in data["results"]
          if r.get("status") == "ok"}
    cells = [dict(n_tokens=n, dtype=d, regime=g, ratio=ms / ok[("m2po_ops[torch]/paper", n, d, g)])
             for (name, n, d, g), ms in ok.items()
             if name == "sorted-eager" and ("m2po_ops[torch]/paper", n, d, g) in ok]
    if not cells:
        return ""
    big = [r for r in cells if r["n_tokens"] >= TARGET_FROM]
    small = [r for r in cells if r["n_tokens"] < TARGET_FROM]
    missed = [r for r in big if r["ratio"] < TARGET_SPEEDUP]
    slower = [r for r in small if r["ratio"] < 1.0]

    def where(rs):
        return ", ".join(f"{_size(r['n_tokens'])} {r['dtype']} {r['regime']} {r['ratio']:.2f}x" for r in rs)

    out = [f"m2po_ops[torch]/paper vs sorted-eager: "
           + (f">= {TARGET_SPEEDUP:g}x at every size >= {_size(TARGET_FROM)} in every regime and dtype "
              f"(min {min(r['ratio'] for r in big):.2f}x)" if big and not missed else
              f"below {TARGET_SPEEDUP:g}x at {where(missed)}" if missed else f"no size >= {_size(TARGET_FROM)} timed")]
    if small:
        out.append(f"never slower below {_size(TARGET_FROM)} (min {min(r['ratio'] for r in small):.2f}x)" if not slower
                   else f"slower at {where(slower)}")
    return "\n" + "; ".join(out)


if __name__ == "__main__":  # python -m bench.report results/x.json: rewrite the tables (.md) and the plot
    for p in sys.argv[1:]:
        with open(p) as f:
            d = json.load(f)
        text = tables(d)
        print(text)
        with open(os.path.splitext(p)[0] + ".md", "w") as f:
            f.write(text + "\n")
        plot(d, os.path.splitext(p)[0] + ".png")
