"""The GPU suite's summary (gpu_suite.md) from the JSON lines its steps appended. Standard library only.

Reads OUT/steps.jsonl, tests.jsonl, throughput.jsonl, train.jsonl and kernels.jsonl; a line that is
not JSON (a step killed mid-write) is counted and skipped. The step table comes last: it is the
summary a reader sees first at the end of the log.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

TARGETS = {"XL": 113.0, "H": 90.0}  # images/s at 256 px, batch 64, bf16, 20 steps, CFG 2.0 (issue 5)
TRAIN_MFU_TARGET = 0.50
FILES = ("steps", "tests", "throughput", "train", "kernels")


def read(out: Path) -> tuple[dict[str, list[dict]], int]:
    records, broken = {}, 0
    for name in FILES:
        path = out / f"{name}.jsonl"
        rows = []
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                rows.append(json.loads(line))
            except ValueError:
                broken += 1
        records[name] = rows
    return records, broken


def _f(x, fmt="{:.1f}", none="-"):
    return none if x is None else fmt.format(x)


def environment(records: dict) -> str:
    for name in ("throughput", "train", "kernels"):
        for r in records[name]:
            if "device" in r:
                return (f"{r['device']}; torch {r.get('torch')}, triton {r.get('triton')}, commit {r.get('commit')}, "
                        f"{r.get('time', '')}")
    return "no measurement recorded (device unknown)"


def tests_section(rows: list[dict]) -> list[str]:
    lines = ["## Tests", "", "| step | passed | failed | skipped |", "|---|---|---|---|"]
    by_step = {}
    for r in rows:
        by_step.setdefault(r.get("step", ""), Counter())[r["outcome"]] += 1
    for step, c in by_step.items():
        lines.append(f"| {step} | {c['passed']} | {c['failed']} | {c['skipped']} |")
    failed = [r for r in rows if r["outcome"] == "failed"]
    for r in failed[:20]:
        lines.append(f"- FAILED {r['test']}: {r.get('message', '').splitlines()[-1] if r.get('message') else ''}")
    reasons = Counter(r.get("reason", "") for r in rows if r["outcome"] == "skipped")
    for reason, n in reasons.most_common(8):
        lines.append(f"- skipped x{n}: {reason}")
    return lines + [""]


def throughput_section(rows: list[dict]) -> list[str]:
    lines = ["## Throughput (bf16 on CUDA; batch, steps and CFG as in each row)", "",
             "| model | mode | batch | img/s | spread | MFU | flow MFU | peak GiB | clip / text VAE / flow / decoder | target |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("benchmark") == "skipped":
            lines.append(f"| {r['model']} | {r['mode']} | | skipped: {r['reason']} | | | | | | |")
            continue
        if r.get("benchmark") != "throughput":
            continue
        st = r["stages_s"]
        split = " / ".join(f"{100 * st[k] / r['seconds_median']:.0f}%" for k in ("clip", "text_vae", "flow", "decoder"))
        tgt = TARGETS.get(r["model"]) if r.get("batch") == 64 else None
        target = f">= {tgt:g}: {'met' if r['images_per_s'] >= tgt else 'not met'}" if tgt else ""
        lines.append(f"| {r['model']} | {r['mode']} | {r['batch']} | {r['images_per_s']:.3g} | "
                     f"{r['batch'] / r['seconds_max']:.3g}-{r['batch'] / r['seconds_min']:.3g} | {100 * r['mfu']:.1f}% | "
                     f"{100 * r['flow_mfu']:.1f}% | {_f(r.get('peak_mem_gib'))} | {split} | {target} |")
    ceil = next((r for r in rows if "ceiling_tflops" in r), None)
    if ceil:
        lines.append(f"\nCeilings measured in the same run: {ceil['ceiling_tflops']:.4g} TFLOP/s ({ceil['ceiling_matmul']} "
                     f"matmul), {ceil.get('ceiling_copy_gbps', 0):.4g} GB/s ({ceil.get('ceiling_copy', '?')} copy).")
    return lines + [""]


def train_section(rows: list[dict], plan: dict) -> list[str]:
    lines = ["## Training step (one GPU, AdamW, bf16 autocast; the planner's ops, policy and batch)", "",
             "| model | ops | recompute | batch | samples/s | MFU | peak GiB measured | planner predicted | error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("benchmark") == "train_oom":
            lines.append(f"| {r['model']} | | | {r['batch']} | out of memory: retried smaller | | | | |")
        if r.get("benchmark") != "train":
            continue
        p = plan.get(r["model"]) or plan.get(r["model"].lower()) or {}
        pred = None
        if p and p.get("fixed_gib") is not None:
            pred = p["fixed_gib"] + p["per_sample_mib"] * r["batch"] / 1024
        peak = r.get("peak_mem_gib")
        err = f"{100 * (pred - peak) / peak:+.1f}%" if pred is not None and peak else "-"
        lines.append(f"| {r['model']} | {r['ops']} | {r['recompute']} | {r['batch']} | {r['samples_per_s']:.4g} | "
                     f"{100 * r['mfu']:.1f}% (target {100 * TRAIN_MFU_TARGET:.0f}%) | {_f(peak)} | {_f(pred)} | {err} |")
    return lines + [""]


def kernels_section(rows: list[dict]) -> list[str]:
    lines = ["## Kernels (p50; GB/s against the measured copy ceiling)", "",
             "| op | mode | shape | impl | p50 ms | GB/s | of copy | TFLOP/s | vs eager |", "|---|---|---|---|---|---|---|---|---|"]
    eager = {(r["op"], r["mode"], json.dumps(r.get("shape"))): r["p50_ms"] for r in rows
             if r.get("impl") == "eager" and "p50_ms" in r}
    for r in rows:
        shape = " ".join(f"{k}={v}" for k, v in (r.get("shape") or {}).items())
        if "error" in r or "p50_ms" not in r:
            lines.append(f"| {r.get('op')} | {r.get('mode')} | {shape} | {r.get('impl')} | {r.get('error', '-')} | | | | |")
            continue
        e = eager.get((r["op"], r["mode"], json.dumps(r.get("shape"))))
        lines.append(f"| {r['op']} | {r['mode']} | {shape} | {r['impl']} | {r['p50_ms']:.4g} | {_f(r.get('gbps'), '{:.0f}')} | "
                     f"{_f(r.get('frac_bw') and 100 * r['frac_bw'], '{:.0f}%')} | {_f(r.get('tflops'), '{:.1f}')} | "
                     f"{_f(e and e / r['p50_ms'], 'x{:.2f}')} |")
    return lines + [""]


def steps_section(rows: list[dict], total: float) -> list[str]:
    lines = ["## Steps", "", "| step | planned s | took s | result |", "|---|---|---|---|"]
    for r in rows:
        res = r["rc"]
        text = "ok" if res == 0 else ("TIMEOUT (killed with its process group)" if res == "timeout" else
                                       f"skipped: {r.get('reason', '')}" if res == "skipped" else f"exit code {res}")
        lines.append(f"| {r['step']} | {r['budget_s']:.0f} | {r['seconds']:.0f} | {text} |")
    took = rows[-1]["elapsed_s"] if rows else 0
    lines.append(f"\nPlanned {total:.0f} s in all; took {took:.0f} s.")
    return lines


def markdown(out: Path, total: float, rehearse: bool = False, plan: dict | None = None) -> str:
    records, broken = read(out)
    if plan is None:
        plan_file = Path(__file__).resolve().parent / "gpu_plan.json"
        plan = json.loads(plan_file.read_text()) if plan_file.is_file() else {}
    head = ["# GPU suite" + (" REHEARSAL (CPU, tiny shapes: no GPU number)" if rehearse else ""), "",
            environment(records), ""]
    if broken:
        head += [f"{broken} record line(s) were cut off (a step killed while writing) and skipped.", ""]
    return "\n".join(head + tests_section(records["tests"]) + throughput_section(records["throughput"])
                     + train_section(records["train"], plan) + kernels_section(records["kernels"])
                     + steps_section(records["steps"], total)) + "\n"
