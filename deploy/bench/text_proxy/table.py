#!/usr/bin/env python3
"""Formats `oodgate eval --json` of the text-proxy run as a markdown table.

Rows kept: OLE on every bank except the NegLabel one (the bank variants), MCM and energy once
(they use only the ID rows, so every bank gives the same numbers), NegLabel on its own bank;
each static row is followed by its adaptive row when the run has one. Columns: FPR95 and
AUROC per OOD set and averaged (percent), and the paired bootstrap 95% interval of the average
FPR95 difference to the reference (eval's first row). usage: table.py results.json [manifest]
"""
import json
import sys


def pct(x):
    return f"{100 * x:.2f}"


def main():
    res = json.load(open(sys.argv[1]))
    manifest = json.load(open(sys.argv[2])) if len(sys.argv) > 2 else {}
    sets = [s["name"] for s in res["ood_sets"]]
    keep = []
    seen_idonly = set()
    for r in res["results"]:
        bank, method = r["bank_label"], r["method"]
        if method == "ole" and bank != "neglabel":
            keep.append(r)
        elif method in ("mcm", "energy") and (method, r.get("adaptive")) not in seen_idonly:
            seen_idonly.add((method, r.get("adaptive")))
            keep.append(r)
        elif method == "neglabel" and bank == "neglabel":
            keep.append(r)
    ref = res["bootstrap"]["reference"]
    enc = manifest.get("encoder", {})
    print(
        f"Text proxy (captions stand in for images; not an image benchmark). Encoder: "
        f"{enc.get('model', '?')} from the PyPI package {enc.get('package', '?')} "
        f"{enc.get('package_version', '')}. ID test inputs: {res['n_id']}; OOD: "
        + ", ".join(f"{s['name']} {s['n']}" for s in res["ood_sets"])
        + f". Percent; Δ = paired bootstrap 95% interval ({res['bootstrap']['replicates']} "
        f"replicates) of the average FPR95 difference to `{ref}`.\n"
    )
    head = ["bank / method"]
    for s in sets:
        head += [f"{s} FPR95", f"{s} AUROC"]
    head += ["avg FPR95", "avg AUROC", "Δ avg FPR95 [95% CI]"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in keep:
        name = r["method"] if r["method"] in ("mcm", "energy") else f"{r['bank_label']} / {r['method']}"
        if r.get("adaptive"):
            name += " + adaptive"
        cells = [name]
        for s in sets:
            cells += [pct(r["sets"][s]["fpr95"]), pct(r["sets"][s]["auroc"])]
        cells += [f"**{pct(r['average']['fpr95'])}**", pct(r["average"]["auroc"])]
        v = r.get("vs_first")
        if v:
            f = v["average"]["fpr95"]
            cells.append(f"{100 * f['diff']:+.2f} [{100 * f['lo']:+.2f}, {100 * f['hi']:+.2f}]")
        else:
            cells.append("reference")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
