"""The checks that mean something only on a GPU, in one run of a few minutes on one H100/H200, into one report.

    python tools/gpu_check.py                  # on a GPU node: writes gpu_check.json and gpu_check.md
    python tools/gpu_check.py --dry-run        # anywhere: every step at toy sizes, to check the script itself

1. tests/test_gpu.py: bf16 against fp32 (logits, loss, a short FSDP training run over NCCL at world size 1) and the
   compiled decode step against the eager one.
2. tools/memory.py --measure, 7B and 13B: one real rank of a simulated world of 8 runs full stage-2 steps at real
   shapes; its peak memory, tokens/s and (compute-only) MFU.
3. tools/bench_generate.py --size 7b --compile: 7B-shaped decoding, eager and compiled, against transformers'
   generate: time to first token, tokens/s, fraction of the memory-bandwidth roofline.
Each step runs in its own process with its own time limit (its share of --minutes, 8 by default, and at least 30 s);
a failed or timed-out step is reported with its output and the others still run.
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def steps(dry_run, scratch):
    """(name, command, share of the time budget, JSON file the command writes or None)."""
    memory_json, bench_json = os.path.join(scratch, "memory.json"), os.path.join(scratch, "bench.json")
    if dry_run:
        return [("GPU tests", ["-m", "pytest", "-q", "tests/test_gpu.py"], 0.3, None),
                ("memory, 7B and 13B (arithmetic only: no GPU)", ["tools/memory.py", "--json", memory_json], 0.3,
                 memory_json),
                ("decode, tiny", ["tools/bench_generate.py", "--size", "tiny", "--repeats", "1", "--new-tokens", "8",
                                  "--json", bench_json], 0.4, bench_json)]
    return [("GPU tests", ["-m", "pytest", "-q", "-rs", "tests/test_gpu.py"], 0.3, None),
            ("memory, 7B and 13B stage 2 (one rank of 8)", ["tools/memory.py", "--measure", "--json", memory_json],
             0.4, memory_json),
            ("decode, 7B bf16, eager and --compile", ["tools/bench_generate.py", "--size", "7b", "--dtype", "bfloat16",
                                                      "--compile", "--repeats", "3", "--json", bench_json],
             0.3, bench_json)]


def device_name():
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_step(command, timeout):
    start = time.time()
    try:
        result = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True,
                                timeout=timeout)
        output = result.stdout + result.stderr
        status = "passed" if result.returncode == 0 else f"failed (exit {result.returncode})"
        if status == "passed" and re.search(r"\bskipped\b", output) and not re.search(r"\bpassed\b", output):
            status = "skipped"  # pytest ran nothing (no GPU)
    except subprocess.TimeoutExpired as e:
        output = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr))
        status = f"timed out after {timeout:.0f} s"
    return status, output, time.time() - start


def markdown(report):
    lines = [f"# GPU check: {report['device']}", "", f"`{report['command']}`; torch {report['torch']}, "
             f"transformers {report['transformers']}; {report['seconds']:.0f} s in all.", ""]
    for step in report["steps"]:
        lines += [f"## {step['name']}: {step['status']} ({step['seconds']:.0f} s)", "", "```",
                  step["output_tail"].rstrip(), "```", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="toy sizes, no GPU needed")
    p.add_argument("--minutes", type=float, default=8.0, help="time budget for the whole run")
    p.add_argument("--out", default="gpu_check", help="report path without extension (.json and .md are written)")
    args = p.parse_args(argv)
    import torch
    import transformers

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; run with --dry-run to check the script on a CPU")
    start, budget = time.time(), args.minutes * 60
    report = {"device": device_name(), "command": " ".join(["python", "tools/gpu_check.py", *(argv or sys.argv[1:])]),
              "torch": torch.__version__, "transformers": transformers.__version__, "steps": []}
    with tempfile.TemporaryDirectory() as scratch:
        for name, command, share, result_file in steps(args.dry_run, scratch):
            left = budget - (time.time() - start)
            status, output, seconds = run_step(command, max(30.0, min(left, share * budget)))
            step = {"name": name, "command": " ".join(["python", *command]), "status": status, "seconds": seconds,
                    "output_tail": output[-4000:]}
            if result_file and os.path.exists(result_file):
                with open(result_file) as f:
                    step["results"] = json.load(f)
            report["steps"].append(step)
            print(f"{name}: {status} ({seconds:.0f} s)", flush=True)
    report["seconds"] = time.time() - start
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(report))
    print(f"report: {args.out}.json, {args.out}.md")
    return report


if __name__ == "__main__":
    main()
