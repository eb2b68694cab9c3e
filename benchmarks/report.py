"""Markdown from the results: the full report (``results.md``), the targets, and the README summary."""

from __future__ import annotations

import re

from benchmarks.common import MODE_TITLES, describe_machine

README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"
MIB = 2**20


def _f(x, fmt="{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _cell(s: dict | None, fmt="{:.2f}") -> str:
    if not s or s.get("median") is None:
        return "-"
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"


def _rate_label(k: str) -> str:
    return "1 (all detached)" if k == "1" else k


# ---------------------------------------------------------------------- targets
def targets(results: dict) -> list[dict]:
    """Each target with the measured values it is judged on and whether it is met (None: not measured)."""
    st = results.get("step_time", {})
    mem = results.get("memory", {})
    rows = []

    values, ok = [], []
    for mode, res in st.items():
        for name, lim in res.get("limit", {}).items():
            if not name.startswith("dropbp"):
                continue
            for k in ("0.5", "0.875"):
                e = lim["per_rate"].get(k, {}).get("efficiency")
                if e is not None:
                    values.append(f"{mode} {name} p={k}: {e:.2f}")
                    ok.append(e >= 0.9)
    rows.append({"target": "efficiency >= 0.9 at p = 0.5 and 0.875 (dropbp candidates, own T0/T1)",
                 "values": values, "met": all(ok) if ok else None,
                 "met_count": f"{sum(ok)}/{len(ok)}"})

    full = st.get("full", {})
    s = full.get("speedup_vs_inductor", {}).get("dropbp-inductor", {}).get("0.5")
    rows.append({"target": "dropbp+inductor at p = 0.5 >= 1.3x faster than torch.compile (inductor) alone, full FT",
                 "values": [f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})"] if s else [],
                 "met": (s["median"] >= 1.3) if s else None})

    values, ok = [], []
    for mode, res in st.items():
        for label, sp in res.get("overhead_p0", {}).items():
            if label.startswith("dropbp-aot_eager"):
                continue
            values.append(f"{mode} {label}: {sp['median'] - 1:+.1%}")
            ok.append(abs(sp["median"] - 1) <= 0.03)
    rows.append({"target": "overhead at p = 0 within 3% (dropbp-eager vs eager, dropbp-inductor vs inductor)",
                 "values": values, "met": all(ok) if ok else None, "met_count": f"{sum(ok)}/{len(ok)}"})

    values, ok, exact = [], [], []
    for mode, res in mem.items():
        for name, entry in res.get("saved", {}).items():
            if not name.startswith("dropbp"):
                continue
            for k, e in entry["per_rate"].items():
                if "deviation_nominal" in e:
                    values.append(f"{mode} {name} p={k}: {e['deviation_nominal']:+.1%} (mask-exact "
                                  f"{_f(e.get('deviation_mask_exact'), '{:+.1%}')})")
                    ok.append(abs(e["deviation_nominal"]) <= 0.05)
                    if e.get("deviation_mask_exact") is not None:
                        exact.append(abs(e["deviation_mask_exact"]) <= 0.05)
    rows.append({"target": "saved bytes within 5% of (1-p) x branch share, i.e. ratio to no-drop vs 1 - p x share "
                           "(nominal p; mask-exact: the masks actually drawn)",
                 "values": values, "met": all(ok) if ok else None, "met_count": f"{sum(ok)}/{len(ok)}",
                 "met_mask_exact": all(exact) if exact else None, "met_mask_exact_count": f"{sum(exact)}/{len(exact)}"})

    values, ok = [], []
    for mode, res in st.items():
        for name, per in res.get("speedup_vs_hand", {}).items():
            if not name.startswith("dropbp"):
                continue
            for k, sp in per.items():
                if 0 < float(k) < 1 and sp["median"] is not None:
                    values.append(f"{mode} {name} p={k}: {sp['median']:.2f}x")
                    ok.append(sp["median"] > 1.0)
    rows.append({"target": "faster than hand-detach at every p > 0 (paired median)", "values": values,
                 "met": all(ok) if ok else None, "met_count": f"{sum(ok)}/{len(ok)}"})

    values, ok = [], []
    for mode, res in mem.items():
        for name, per in res.get("vs_hand", {}).items():
            for k, c in per.items():
                if float(k) <= 0:
                    continue
                values.append(f"{mode} {name} p={k}: saved {_f(c['saved_vs_hand'], '{:.3f}')}, peak rise "
                              f"{_f(c['peak_rise_vs_hand'], '{:.3f}')}")
                ok.append(all(x is not None and x <= 1.0 for x in (c["saved_vs_hand"], c["peak_rise_vs_hand"])))
    rows.append({"target": "never more memory than hand-detach (saved bytes and peak rise, same masks)",
                 "values": values, "met": all(ok) if ok else None, "met_count": f"{sum(ok)}/{len(ok)}"})
    return rows


def _met(row) -> str:
    if row["met"] is None:
        return "not measured"
    text = "yes" if row["met"] else "no"
    if "met_count" in row:
        text += f" ({row['met_count']})"
    if row.get("met_mask_exact") is not None:
        text += f"; mask-exact: {'yes' if row['met_mask_exact'] else 'no'} ({row['met_mask_exact_count']})"
    return text


# ---------------------------------------------------------------------- tables
def main_table(results: dict, spreads: bool = True) -> list[str]:
    """Step time relative to plain eager, per candidate and rate, for each mode."""
    lines = []
    for mode, res in results.get("step_time", {}).items():
        if "ratio_vs_eager" not in res:
            continue
        rates = [k for k in res["rates"]]
        lines += [f"**{MODE_TITLES.get(mode, mode)}**: step time / plain eager step, same round "
                  f"(median{' (min-max)' if spreads else ''} of {res['rounds']} rounds; lower is faster)", ""]
        lines.append("| candidate | " + " | ".join(f"p = {_rate_label(k)}" for k in rates) + " |")
        lines.append("| --- |" + " --- |" * len(rates))
        for name, per in res["ratio_vs_eager"].items():
            cells = []
            for k in rates:
                s = per.get(k)
                cells.append((_cell(s) if spreads else _f(s["median"])) if s else "")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lim = res.get("limit", {}).get("reference (eager pieces)")
        if lim:
            cells = [_f(lim["theory_ratio"].get(k)) if k not in ("0", "1") else "" for k in rates]
            lines.append("| *speed model (eager F+R, B)* | " + " | ".join(cells) + " |")
        fr = res.get("drop_fraction", {})
        lines.append("| *realised drop fraction* | " + " | ".join(_f(fr.get(k)) for k in rates) + " |")
        lines.append("")
    return lines


def targets_table(rows: list[dict], detail: bool) -> list[str]:
    lines = ["| target | measured | met |", "| --- | --- | --- |"]
    for row in rows:
        values = row["values"]
        shown = "; ".join(values) if detail or len(values) <= 4 else "; ".join(values[:4]) + f"; ... ({len(values)})"
        lines.append(f"| {row['target']} | {shown or '-'} | {_met(row)} |")
    return lines


def full_report(results: dict) -> str:
    meta = results["meta"]
    L = [f"# dropbp-fx benchmarks", "",
         f"{meta['date']}, {describe_machine(meta['machine'])}.  ",
         f"Command: `{meta['command']}`" + (" (quick mode: smoke-test sizes, not a measurement)" if meta["quick"] else "")
         + (f"; commit {meta['git']['commit']}{' with local changes to dropbp_fx/ or passes/' if meta['git'].get('library_modified') else ''}"
            if meta.get("git", {}).get("commit") else "") + ".  ",
         f"Model: {meta['sizes_description']}; AdamW; {meta['rounds']} measured rounds after {meta['warmup']} "
         f"warm-up rounds, candidate order shuffled each round; total run time {meta.get('run_s', 0) / 60:.1f} min.",
         f"Inductor cache: `{meta.get('inductor_cache_dir')}` ({'warm' if meta.get('inductor_cache_warm') else 'empty'} "
         "at the start: compile times below depend on it; `--cold-compile` starts from an empty one)."]
    loads = [x for x in meta.get("load") or [] if x is not None]
    if loads:
        L[-1] += "  "
        L.append(f"Load average (1 min) at the start and after each stage: {', '.join(f'{x:.1f}' for x in loads)} "
                 f"(2 cores: above 2, other work was competing for them).")
    L.append("")
    if results.get("errors"):
        L += ["## Errors", ""] + [f"- {k}: `{v.splitlines()[-1] if v else ''}`" for k, v in results["errors"].items()] + [""]

    L += ["## Targets", ""] + targets_table(results.get("targets", []), detail=True) + [""]
    L += ["## 1. Step time", "", "Ratios of paired step times (forward + backward + AdamW step) from the same round; "
          "rate 1 is every branch detached (T1 of the speed model).", ""]
    L += main_table(results)

    for mode, res in results.get("step_time", {}).items():
        L += [f"Median step times, {MODE_TITLES.get(mode, mode)} (seconds):", "",
              "| candidate | " + " | ".join(f"p = {k}" for k in res["rates"]) + " |",
              "| --- |" + " --- |" * len(res["rates"])]
        for name, per in res["median_s"].items():
            L.append(f"| {name} | " + " | ".join(_f(per.get(k), "{:.3f}") if k in per else "" for k in res["rates"]) + " |")
        L.append("")
        if res.get("speedup_vs_inductor"):
            L += [f"Speedup over `torch.compile` (inductor, no DropBP), {MODE_TITLES.get(mode, mode)}: inductor step / "
                  "candidate step, same round", "", "| candidate | " + " | ".join(f"p = {k}" for k in res["rates"]) + " |",
                  "| --- |" + " --- |" * len(res["rates"])]
            for name, per in res["speedup_vs_inductor"].items():
                L.append(f"| {name} | " + " | ".join(_cell(per.get(k)) for k in res["rates"]) + " |")
            L.append("")
        if res.get("speedup_vs_hand"):
            L += [f"Speedup over the hand-wrapped published approach, {MODE_TITLES.get(mode, mode)}: hand-detach step / "
                  "candidate step at the same rate and mask, same round", "",
                  "| candidate | " + " | ".join(f"p = {k}" for k in res["rates"]) + " |",
                  "| --- |" + " --- |" * len(res["rates"])]
            for name, per in res["speedup_vs_hand"].items():
                L.append(f"| {name} | " + " | ".join(_cell(per.get(k)) for k in res["rates"]) + " |")
            L.append("")

    L += ["## 2. The limit (speed model: step = F + (1-p) B + R)", "",
          "Per candidate: T0 = its step at p = 0, T1 = its step with every branch detached, B = T0 - T1; "
          "theory(p) = 1 - p B/T0 (as a ratio to T0); efficiency = (T0 - Tp) / (p B), from medians of paired ratios; "
          "the per-round range is in brackets. *Realised*: the same with the drop fraction the top-up rule actually "
          "realised (it drops at least floor(p n) of n branches, so more than p on average).", ""]
    for mode, res in results.get("step_time", {}).items():
        L += [f"**{MODE_TITLES.get(mode, mode)}**", "",
              "| candidate | B/T0 | p | theory Tp/T0 | measured Tp/T0 | efficiency | efficiency (realised) |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, lim in res.get("limit", {}).items():
            if name.startswith("reference"):
                L.append(f"| {name} | {_f(lim['branch_share'])} | | "
                         + ", ".join(f"{k}: {_f(v)}" for k, v in lim["theory_ratio"].items()) + " | | | |")
                continue
            for k, e in lim["per_rate"].items():
                eff = e["efficiency_per_round"]
                L.append(f"| {name} | {_f(lim['branch_share'])} | {k} | {_f(e['theory_ratio'])} | "
                         f"{_cell(e['measured_ratio'])} | {_f(e['efficiency'])} [{_f(eff['min'])}, {_f(eff['max'])}] | "
                         f"{_f(e.get('efficiency_realised'))} |")
        L.append("")

    L += ["## 4. Overhead at p = 0", "", "| comparison | step ratio, median (min-max) |", "| --- | --- |"]
    for mode, res in results.get("step_time", {}).items():
        for label, sp in res.get("overhead_p0", {}).items():
            L.append(f"| {mode}: {label} | {_cell(sp, '{:.3f}')} |")
    L += ["", "## Compile times", "",
          "First step = Dynamo + the passes + the first pieces; warm-up = the untimed rounds after it (the dropped "
          "variants compile there); inner = time inside the inner compiler (`dbp.compile_cache.seconds`).", "",
          "| mode | candidate | first step (s) | warm-up rounds (s) | inner compile (s) | pieces | cache hits | "
          "pieces compiled while measuring |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode, res in results.get("step_time", {}).items():
        for name, c in res.get("compile", {}).items():
            L.append(f"| {mode} | {name} | {_f(c.get('first_step_s'), '{:.1f}')} | {_f(c.get('warmup_rounds_s'), '{:.1f}')} | "
                     f"{_f(c.get('inner_compile_s'), '{:.1f}')} | {c.get('pieces_compiled', '-')} | {c.get('cache_hits', '-')} | "
                     f"{c.get('pieces_compiled_during_measurement', '-')} |")
    L.append("")

    mem = results.get("memory", {})
    if mem:
        L += ["## 3. Activation memory", "",
              "Saved bytes: bytes held for backward at the end of the forward (saved-tensor hooks, each storage once, "
              "parameters excluded), mean over the masks, as a ratio to the same candidate at p = 0. Expected "
              "(nominal) = 1 - p x share, share = 1 - saved(all detached)/saved(p=0); mask-exact = from per-branch "
              "bytes and the masks actually drawn. Peak rise: the highest memory during a training step minus what the "
              "process held just before it (one training step per mask, the max over the masks of a rate).", "",
              f"Peak method: {next(iter(next(iter(mem.values()))['workers'].values()), {}).get('peak_method', '-')}", ""]
        for mode, res in mem.items():
            L += [f"**{MODE_TITLES.get(mode, mode)}**", "",
                  "| candidate | p | saved (MiB) | ratio to p=0 (min-max) | expected nominal | expected mask-exact | "
                  "peak rise (MiB) |", "| --- | --- | --- | --- | --- | --- | --- |"]
            for name, entry in res.get("saved", {}).items():
                for k, e in entry["per_rate"].items():
                    rise = res["peak"][name].get(k, {}).get("rise", {}).get("max")
                    L.append(f"| {name} | {_rate_label(k)} | {e['bytes_mean'] / MIB:.1f} | {_cell(e['ratio'], '{:.3f}')} | "
                             f"{_f(e.get('expected_nominal'), '{:.3f}')} | {_f(e.get('expected_mask_exact'), '{:.3f}')} | "
                             f"{_f(rise / MIB if rise is not None else None, '{:.1f}')} |")
            if res.get("vs_hand"):
                L += ["", "Versus hand-detach at the same masks (ratios; <= 1 is no more memory):", "",
                      "| candidate | p | saved bytes | peak rise |", "| --- | --- | --- | --- |"]
                for name, per in res["vs_hand"].items():
                    for k, c in per.items():
                        L.append(f"| {name} | {_rate_label(k)} | {_f(c['saved_vs_hand'], '{:.3f}')} | "
                                 f"{_f(c['peak_rise_vs_hand'], '{:.3f}')} |")
            if res.get("errors"):
                L += [""] + [f"- worker error, {k}: `{v.splitlines()[-1]}`" for k, v in res["errors"].items()]
            L.append("")
    seq = results.get("seq_search", {})
    if seq:
        L += ["### Longest sequence within a fixed budget of saved activations", ""]
        for mode, res in seq.items():
            L += [f"{MODE_TITLES.get(mode, mode)}: budget = what plain eager saves at seq {res['sizes']['seq']}, batch "
                  f"{res['sizes']['batch']}: {res['budget_bytes'] / MIB:.1f} MiB; sequence lengths in steps of "
                  f"{res['granule']}; for a rate, the mean over {res['masks']} masks must fit.", "",
                  "| run | longest sequence | vs eager | saved there (MiB) | next step (MiB) | probes |",
                  "| --- | --- | --- | --- | --- | --- |"]
            for label, r in res["results"].items():
                nxt = f"{r['next_bytes'] / MIB:.1f} at {r['next_seq']}" if r.get("next_bytes") else "-"
                L.append(f"| {label} | {r['seq']}{' (cap)' if r.get('capped') else ''} | {_f(r['seq_vs_eager'])}x | "
                         f"{r['bytes'] / MIB:.1f} | {nxt} | {r['probes']} |")
            L.append("")

    L += ["## Notes", "",
          "- The top-up rule drops at least floor(p n) of the n = 16 branches and tops up after the coin flips, so "
          "the realised drop fraction is above p (the *realised drop fraction* rows): efficiencies against the "
          "nominal p can exceed 1; the *realised* columns divide by the fraction actually dropped.",
          "- Compiled candidates (`dropbp-*`, `inductor`) run transformers' traced code path. With torch < 2.14, "
          "transformers does not use SDPA's `is_causal` shortcut while Dynamo traces and builds an explicit float "
          "causal mask, which SDPA saves for backward (batch x seq^2 x 4 bytes per layer; checked on torch 2.13, "
          "transformers 5.24). That is the extra ~2% that `dropbp-eager` saves over plain eager and hand-detach at "
          "seq 256, and why `dropbp p=0` fits a shorter sequence than plain eager: it grows with seq^2.",
          "- `dropbp-aot_eager` is left out of the memory benchmark to keep the run short.",
          "- First-step (compile) times are single measurements on a shared machine.",
          ""]
    L += ["## Checks", ""]
    for mode, res in results.get("step_time", {}).items():
        checks = ", ".join(f"{n} {c['mismatches']}/{c['checked']}" for n, c in res.get("mask_checks", {}).items())
        L.append(f"- {mode} step time: masks differing from the expected top-up mask: {checks or '-'}; Dynamo graphs "
                 f"compiled during the measured rounds: {res.get('dynamo_graphs_compiled_during_measurement')}.")
    for mode, res in mem.items():
        checks = ", ".join(f"{n} {w['mask_checks']['mismatches']}/{w['mask_checks']['checked']}"
                           for n, w in res.get("workers", {}).items() if w["mask_checks"]["checked"])
        same = all(c["same_masks"] for per in res.get("vs_hand", {}).values() for c in per.values())
        L.append(f"- {mode} memory: mask mismatches {checks or '-'}; backend and hand-detach measured at the same masks: "
                 f"{'yes' if same else 'NO'}.")
    for mode, res in seq.items():
        c = res["mask_checks"]
        L.append(f"- {mode} sequence search: mask mismatches {c['mismatches']}/{c['checked']}.")
    L.append("")
    return "\n".join(L)


def readme_section(results: dict) -> str:
    meta = results["meta"]
    L = [README_START, "",
         f"{meta['date']}, {describe_machine(meta['machine'])}; {meta['sizes_description']}, AdamW; "
         f"{meta['rounds']} measured rounds after {meta['warmup']} warm-up rounds, order shuffled per round.",
         f"Command: `{meta['command']}` (about {meta.get('run_s', 0) / 60:.0f} min"
         + (f", commit {meta['git']['commit']}" if meta.get("git", {}).get("commit") else "") + "). Full report, memory, "
         "efficiencies and compile times: [benchmarks/results/results.md](../benchmarks/results/results.md).", ""]
    L += main_table(results, spreads=False)
    L += ["| target | met |", "| --- | --- |"] + [
        f"| {row['target']} | {_met(row)}{': ' + row['values'][0] if len(row['values']) == 1 else ''} |"
        for row in results.get("targets", [])]
    L += ["", README_END]
    return "\n".join(L)


def update_bench_section(path: str, section: str) -> None:
    """Replace the text between the bench markers of ``path`` (docs/benchmarks.md) with ``section``; a file
    without both markers is an error (never an appended section)."""
    with open(path) as f:
        text = f.read()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{path} has no {README_START} ... {README_END} markers to replace: put them back around "
                         "the benchmark section, or run with --no-readme")
    text = re.sub(re.escape(README_START) + ".*?" + re.escape(README_END), lambda _: section, text, flags=re.S)
    with open(path, "w") as f:
        f.write(text)
