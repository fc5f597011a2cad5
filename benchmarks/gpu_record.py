"""The GPU check's record: benchmarks/gpu_check.sh calls this after every stage, so that $OUT
holds a complete record of what has run so far even if the call is cut short. No torch import
(it runs between stages, in a fraction of a second).

    gpu_record.py stage DIR NAME --status S --rc N --seconds N --limit N [--log F] [--kind K] [--data F]
        writes DIR/parts/NAME.json: the stage's outcome, plus what its log or data file says
        (kind pytest: the test counts and failed tests; sanitizer: the error and hazard counts;
        json: the stage's own JSON file, embedded)
    gpu_record.py merge DIR OUT_JSON OUT_MD
        joins DIR/parts/*.json (in stage order) into one JSON record and a Markdown summary
"""
import argparse
import glob
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

PYTEST_LINE = re.compile(r"(?:^|\s)(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)(?:\s|$)")
PYTEST_ID = re.compile(r"(tests/\S+::\S+)")


def pytest_summary(log, junit):
    """Counts from the JUnit XML when pytest got to write it, else from the -v log lines (a run
    killed at its time limit writes no XML)."""
    if junit and os.path.exists(junit):
        try:
            root = ET.parse(junit).getroot()
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            total, skipped = int(suite.get("tests")), int(suite.get("skipped"))
            failed, errors = int(suite.get("failures")), int(suite.get("errors"))
            names = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                     if case.find("failure") is not None or case.find("error") is not None]
            return {"source": "junit", "passed": total - skipped - failed - errors, "failed": failed,
                    "errors": errors, "skipped": skipped, "failed_tests": names[:50]}
        except (ET.ParseError, TypeError, AttributeError) as error:
            print(f"gpu_record: unreadable {junit}: {error}", file=sys.stderr)
    counts = {"PASSED": 0, "FAILED": 0, "ERROR": 0, "SKIPPED": 0, "XFAIL": 0, "XPASS": 0}
    failed_tests = []
    seen = set()
    if log and os.path.exists(log):
        for line in open(log, errors="replace"):
            if line.startswith(("FAILED ", "ERROR ", "SKIPPED ")):  # the -r summary repeats results
                continue
            status, test = PYTEST_LINE.search(line), PYTEST_ID.search(line)
            if status and test and (test.group(1), status.group(1)) not in seen:
                seen.add((test.group(1), status.group(1)))
                counts[status.group(1)] += 1
                if status.group(1) in ("FAILED", "ERROR"):
                    failed_tests.append(test.group(1))
    return {"source": "log", "passed": counts["PASSED"] + counts["XPASS"], "failed": counts["FAILED"],
            "errors": counts["ERROR"], "skipped": counts["SKIPPED"] + counts["XFAIL"],
            "failed_tests": failed_tests[:50]}


def sanitizer_summary(log):
    text = open(log, errors="replace").read() if log and os.path.exists(log) else ""
    errors = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    hazards = re.findall(r"RACECHECK SUMMARY: (\d+) hazard", text)
    workload = re.findall(r"^(ok|WRONG|ERROR)\s+(\S+?):", text, re.M)
    # The summaries come at the end; a run cut short still shows the reports printed so far.
    reports = re.findall(r"^========= (Invalid|Race|Error|Program hit|Barrier|Uninitialized)", text, re.M)
    return {"errors": int(errors[-1]) if errors else None, "reports_seen": len(reports),
            "racecheck_hazards": int(hazards[-1]) if hazards else None,
            "workload_cases_ok": sum(v == "ok" for v, _ in workload),
            "workload_cases_failed": [name for v, name in workload if v != "ok"]}


def stage(args):
    part = {"stage": args.name, "status": args.status, "rc": args.rc, "seconds": args.seconds,
            "limit_seconds": args.limit, "note": args.note}
    if args.kind == "pytest":
        part["tests"] = pytest_summary(args.log, args.data)
    elif args.kind == "sanitizer":
        part["sanitizer"] = sanitizer_summary(args.log)
    elif args.kind == "json" and args.data and os.path.exists(args.data):
        try:
            part["data"] = json.load(open(args.data))
        except json.JSONDecodeError as error:
            part["data_error"] = f"unreadable {os.path.basename(args.data)}: {error}"
    if args.log and os.path.exists(args.log):
        tail = open(args.log, errors="replace").read().splitlines()[-8:]
        part["log_tail"] = [line[:300] for line in tail]
    os.makedirs(os.path.join(args.dir, "parts"), exist_ok=True)
    with open(os.path.join(args.dir, "parts", f"{args.order:02d}-{args.name}.json"), "w") as f:
        json.dump(part, f, indent=1)


def markdown(record):
    env = record.get("stages", {}).get("env", {}).get("data", {})
    lines = [f"# GPU check: {env.get('gpu') or 'no GPU'}, torch {env.get('torch', '?')}, cuDNN {env.get('cudnn', '?')}, "
             f"commit {str(env.get('git_commit', '?'))[:12]}", "",
             "| stage | status | seconds (limit) | result |", "|---|---|---:|---|"]
    for name, part in record.get("stages", {}).items():
        result = part.get("note") or ""
        if "tests" in part:
            t = part["tests"]
            result = f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped"
            if t["failed_tests"]:
                result += "; failed: " + ", ".join(t["failed_tests"][:5])
        elif "sanitizer" in part:
            s = part["sanitizer"]
            result = f"sanitizer errors {s['errors']} ({s['reports_seen']} reports seen), hazards " \
                     f"{s['racecheck_hazards']}, workload cases ok " \
                     f"{s['workload_cases_ok']}, wrong/failed {s['workload_cases_failed'] or 'none'}"
        elif name == "sync" and "data" in part:
            d = part["data"]
            bad = [f"{section}/{case}" for section in ("sync_free", "cuda_graph")
                   for case, r in d.get(section, {}).items() if r.get("passed") is False]
            result = f"{d.get('passed')} passed, {d.get('failed')} failed" + (f": {', '.join(bad)}" if bad else "")
        lines.append(f"| {name} | {part['status']} | {part['seconds']} ({part['limit_seconds']}) | {result} |")
    bench = record.get("stages", {}).get("bench", {}).get("data", {})
    if bench.get("configs"):
        lines += ["", "Timings against torch.nn (cuDNN), median ms, speedup = cuDNN time / ours; "
                  "TF32 = cudnn.allow_tf32 / cuda.matmul.allow_tf32 (set alike on both sides)", "",
                  "| config | TF32 | ours fwd | FMA persistent fwd | per-step kernels fwd | cuDNN fwd | fwd speedup | "
                  "ours fwd+bwd | FMA persistent fwd+bwd | per-step kernels fwd+bwd | cuDNN fwd+bwd | "
                  "fwd+bwd speedup | rel. diff vs cuDNN | "
                  "ours fwd us/step: measured / predicted (perf_model.py) | "
                  "ours fwd+bwd us/step: measured / predicted |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        for name, c in bench["configs"].items():
            if "error" in c:
                lines.append(f"| {name} | | {c['error'][:120]} | | | | | | | | | | | | |")
                continue
            tf32 = "/".join("on" if c["tf32"][k] else "off" for k in ("cudnn.allow_tf32", "cuda.matmul.allow_tf32")) \
                if c["dtype"] == "fp32" else "n/a"
            def ms(key):
                return f"{c[key]:.3f}" if key in c else "-"

            prediction = c.get("predicted") or {}
            model = (f"{c['ours_fwd_us_per_step']:.2f} / {prediction['fwd_us_per_step']:.2f} ({prediction['kernel']})"
                     if "fwd_us_per_step" in prediction else "-")
            model_fwdbwd = (f"{c['ours_fwdbwd_ms'] * 1e3 / c['T']:.2f} / {prediction['fwd_bwd_us_per_step']:.2f} "
                            f"({prediction.get('backward_kernel', '?')})" if "fwd_bwd_us_per_step" in prediction else "-")
            lines.append(f"| {name} | {tf32} | {c['ours_fwd_ms']:.3f} | {ms('ours_fma_persistent_fwd_ms')} | "
                         f"{ms('ours_per_step_fwd_ms')} | {c['cudnn_fwd_ms']:.3f} | "
                         f"{c['speedup_fwd']:.2f}x | {c['ours_fwdbwd_ms']:.3f} | {ms('ours_fma_persistent_fwdbwd_ms')} | "
                         f"{ms('ours_per_step_fwdbwd_ms')} | {c['cudnn_fwdbwd_ms']:.3f} | "
                         f"{c['speedup_fwdbwd']:.2f}x | {c['rel_diff_vs_cudnn']:.1e} | {model} | {model_fwdbwd} |")
        sweeps = [(name, c["sweep"]) for name, c in bench["configs"].items() if c.get("sweep")]
        if sweeps:
            lines += ["", "Tile sweep (LSTM_FUSED_PERSISTENT_BLOCKS / _K_SPLIT), median ms, fwd / fwd+bwd:", ""]
            for name, sweep in sweeps:
                lines.append(f"- {name}: " + "; ".join(f"{label} {v['fwd_ms']:.3f} / {v['fwdbwd_ms']:.3f}"
                                                       for label, v in sweep.items()))
        if bench.get("skipped"):
            lines.append(f"\nout of budget, not timed: {', '.join(bench['skipped'])}")
        for key, value in bench.get("peaks", {}).items():
            lines.append(f"\n{key}: {value:.1f}")
    return "\n".join(lines) + "\n"


def merge(args):
    record = {"stages": {}}
    for path in sorted(glob.glob(os.path.join(args.dir, "parts", "*.json"))):
        part = json.load(open(path))
        record["stages"][part["stage"]] = part
    env = record["stages"].get("env", {}).get("data", {})
    record["summary"] = {k: env.get(k) for k in ("gpu", "torch", "cudnn", "git_commit", "csrc_sha256")}
    record["summary"]["stages"] = {name: part["status"] for name, part in record["stages"].items()}
    for path, text in ((args.out_json, json.dumps(record, indent=1)), (args.out_md, markdown(record))):
        with open(path + ".tmp", "w") as f:  # whole files only, even if the call is cut mid-write
            f.write(text)
        os.replace(path + ".tmp", path)


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("stage")
    s.add_argument("dir")
    s.add_argument("name")
    s.add_argument("--order", type=int, default=0)
    s.add_argument("--status", required=True)
    s.add_argument("--rc", type=int, default=None)
    s.add_argument("--seconds", type=int, default=None)
    s.add_argument("--limit", type=int, default=None)
    s.add_argument("--note", default="")
    s.add_argument("--log")
    s.add_argument("--kind", choices=["plain", "pytest", "sanitizer", "json"], default="plain")
    s.add_argument("--data", help="pytest: the JUnit XML; json: the stage's JSON file")
    m = sub.add_parser("merge")
    m.add_argument("dir")
    m.add_argument("out_json")
    m.add_argument("out_md")
    args = parser.parse_args()
    stage(args) if args.command == "stage" else merge(args)


if __name__ == "__main__":
    main()
