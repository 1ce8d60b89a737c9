#!/usr/bin/env python3
"""Combine the per-window records of `kv-validate --windows A..B --records`
slice runs over the same windows into the sweep JSON `kv-validate allocate`
reads (docs/fidelity.md: SmolLM2's sensitivity probes ran as three such
slices). `kv-validate merge` cannot: it needs one run covering its plan.

    records_to_sweep.py OUT.json RECORDS.json...

Labels are the probes' (`k8@2`; bare `k8` is read as `k8@2`) and `reference`
(`all8` is read as it). Per variant: bits/value is the mean over windows of
kv-compress's reported figure, mean KLD the mean over tokens on a compressed
cache, as the sweep computes them.
"""
import json
import math
import sys


def main(out, paths):
    rows, windows_seen, baseline = {}, None, None
    for path in paths:
        records = json.load(open(path))
        windows = [w["index"] for w in records["windows"]]
        if windows_seen is not None and windows != windows_seen:
            sys.exit(f"{path}: windows {windows[0]}..{windows[-1]} differ from the first file's")
        windows_seen = windows
        for index, variant in enumerate(records["variants"]):
            label = variant["label"]
            if label == "all8":
                label = "reference"
            elif "@" not in label:
                label += "@2"
            kld, nll, base, bits = [], [], [], []
            for window in records["windows"]:
                outcome = window["variants"][index]
                kld += [k for k in outcome["kld"] if k is not None]
                nll += outcome["nll"]
                base += window["baseline_nll"]
                bits.append(outcome["metrics"]["bits_per_value"])
            settings = variant["settings"]
            flags = " ".join(
                [f"-group-size {settings['group_size']} -sparsity {settings['sparsity']}"]
                + settings["extra_args"]
            )
            perplexity = math.exp(sum(nll) / len(nll))
            baseline = math.exp(sum(base) / len(base))
            bits_per_value = sum(bits) / len(bits)
            rows.setdefault(label, {
                "label": label,
                "flags": flags,
                "bits_per_value": bits_per_value,
                "compression_ratio": 32 / bits_per_value,
                "perplexity": perplexity,
                "delta": perplexity - baseline,
                "kld_mean": sum(kld) / len(kld),
                "passed": False,
                "pareto": False,
                "pareto_kld": False,
            })
    table = {
        "baseline_perplexity": baseline,
        "threshold": None,
        "max_kld": None,
        "rows": list(rows.values()),
        "recommendation": None,
    }
    with open(out, "w") as f:
        json.dump({"table": table}, f, indent=1)
    print(f"{out}: {len(rows)} rows over windows {windows_seen[0]}..{windows_seen[-1] + 1}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
