"""One GPU check in one command, for the day a GPU is lent: tests, kernel suites, a smoke serve.

    python -m bench.gpu_check OUT_DIR [--budget-s 480] [--dry-run]
    make gpu-check OUT=$OUT

Installs nothing: run it where the wheels of /work/shared/gpu/wheels.sh were installed as
/work/shared/gpu/README.md shows (PYTHONPATH holding them and the repository root). Steps, each
with its own time limit inside the budget (8 minutes on an H100), each logged to OUT_DIR/
gpu_check.log:

1. the device and versions (nvidia-smi, torch, triton);
2. `pytest tests/gpu` (JUnit XML to OUT_DIR/tests_gpu.xml);
3. the three kernel suites of bench.kernels, reduced sweeps (CSV per suite);
4. a smoke-sized serving benchmark: bench.serving_gpu on 4 layers of Llama-3-8B's shape,
   decode at batch 1/8/32 and S-LoRA at 5 and 100 adapters, no PEFT baseline (JSON).

Then it prints, and writes to OUT_DIR/summary.md, the tables that go into docs/benchmarks.md.
At most 7 files in OUT_DIR, the device tool's limit being 8. --dry-run (no GPU needed) runs the
same plumbing with every step's command swapped for one that runs nothing, so a
CPU run checks that the tests collect, each benchmark parses its exact arguments, and the
summary is written.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LOG = "gpu_check.log"
SUMMARY = "summary.md"


@dataclass(frozen=True)
class Step:
    """One command of the check: its name, argv after `python -m`, time limit, output file."""

    name: str
    module_args: tuple[str, ...]
    limit_s: int
    output: str | None = None  # file in OUT_DIR the step writes (--csv/--json/--junitxml)


def steps(out: Path) -> list[Step]:
    """The check's commands, in order; limits sum to under the 8-minute budget."""

    def kernels(suite: str, *extra: str) -> tuple[str, ...]:
        return ("bench.kernels", "--suite", suite, *extra, "--csv", str(out / f"{suite}.csv"))

    serving = ("bench.serving_gpu", "--layers", "4", "--batches", "1,8,32", "--steps", "16")
    serving += ("--context", "256", "--adapters", "5,100", "--peft-at", "", "--requests", "100")
    serving += ("--rate", "50", "--json", str(out / "serving.json"))
    tests = ("pytest", "-x", "-q", "tests/gpu", f"--junitxml={out / 'tests_gpu.xml'}")
    return [
        Step("tests/gpu", tests, 200, "tests_gpu.xml"),
        Step("kernels nf4", kernels("nf4", "--tokens", "1", "8", "32", "64", "256"), 60, "nf4.csv"),
        Step(
            "kernels attention",
            kernels("attention", "--contexts", "512", "4096"),
            40,
            "attention.csv",
        ),
        Step(
            "kernels lora",
            kernels("lora", "--quick", "--ops", "lora_qkv", "expand_gate_up"),
            60,
            "lora.csv",
        ),
        Step("serving smoke", serving, 150, "serving.json"),
    ]


def _environment() -> list[str]:
    """What the machine is: nvidia-smi, and the versions that shape the kernels."""
    lines = []
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        lines.append(smi.stdout or smi.stderr)
    except (OSError, subprocess.TimeoutExpired) as e:
        lines.append(f"nvidia-smi: {e}")
    import torch
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    lines.append(f"torch {torch.__version__}, triton {triton.__version__}, {gpu}")
    return lines


def _dry_argv(step: Step) -> list[str]:
    """The step's command with nothing run: pytest collects, a bench module parses its argv."""
    module, *rest = step.module_args
    if module == "pytest":
        paths = [arg for arg in rest if not arg.startswith("-")]
        return [sys.executable, "-m", "pytest", "--collect-only", "-q", *paths]
    parse = f"import importlib, sys; importlib.import_module({module!r}).parse_args(sys.argv[1:])"
    return [sys.executable, "-c", parse, *rest]


def _run(step: Step, dry_run: bool, log, budget_end: float) -> str:  # type: ignore[no-untyped-def]
    """Run one step (or parse its arguments); its outcome: ok, failed (rc), timeout, skipped."""
    argv = [sys.executable, "-m", *step.module_args]
    if dry_run:
        argv = _dry_argv(step)
    limit = min(step.limit_s, budget_end - time.monotonic())
    if limit <= 5:
        log.write(f"\n== {step.name}: skipped, the budget is spent\n")
        return "skipped (budget)"
    log.write(f"\n== {step.name}: {' '.join(argv[2:])} (limit {limit:.0f} s)\n")
    log.flush()
    start = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=limit, env=env)
    except subprocess.TimeoutExpired:
        log.write(f"\n== {step.name}: timed out after {limit:.0f} s\n")
        return "timeout"
    outcome = "ok" if done.returncode == 0 else f"failed (rc {done.returncode})"
    log.write(f"\n== {step.name}: {outcome} in {time.monotonic() - start:.0f} s\n")
    return outcome


def _csv_table(path: Path) -> list[str]:
    if not path.is_file():
        return ["(no figures)"]
    rows = list(csv.reader(path.open()))
    if not rows:
        return ["(no figures)"]
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return lines + ["| " + " | ".join(r) + " |" for r in rows[1:]]


def _json_tables(path: Path) -> list[str]:
    if not path.is_file():
        return ["(no figures)"]
    results = json.loads(path.read_text())
    lines = [f"device: {results.get('device', '?')}"]
    for part in ("decode", "slora"):
        rows = results.get(part) or []
        if rows:
            keys = list(rows[0])
            lines += ["", f"{part}:", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return lines


def summary(out: Path, outcomes: dict[str, str], environment: list[str], dry_run: bool) -> str:
    """The markdown that goes into docs/benchmarks.md, from whatever the steps wrote."""
    lines = ["# GPU check" + (" (dry run: no figures)" if dry_run else ""), ""]
    lines += ["```", *(line.rstrip() for line in environment[-1:]), "```", ""]
    lines += ["| step | outcome |", "|---|---|"]
    lines += [f"| {name} | {outcome} |" for name, outcome in outcomes.items()]
    for title, name in (("NF4 matmul", "nf4.csv"), ("paged attention", "attention.csv")):
        lines += ["", f"## {title}", "", *_csv_table(out / name)]
    lines += ["", "## LoRA kernels", "", *_csv_table(out / "lora.csv")]
    lines += [
        "",
        "## Serving (4 layers of Llama-3-8B's shape, NF4)",
        "",
        *_json_tables(out / "serving.json"),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run every step within the budget; 0 if every step succeeded."""
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("out", type=Path, help="folder for every log and figure (e.g. $OUT)")
    p.add_argument("--budget-s", type=float, default=480.0, help="all steps together")
    p.add_argument("--dry-run", action="store_true", help="check the plumbing, no GPU needed")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    budget_end = time.monotonic() + args.budget_s
    outcomes: dict[str, str] = {}
    with (args.out / LOG).open("w") as log:
        environment = _environment()
        log.write("\n".join(environment) + "\n")
        for step in steps(args.out):
            outcomes[step.name] = _run(step, args.dry_run, log, budget_end)
    text = summary(args.out, outcomes, environment, args.dry_run)
    (args.out / SUMMARY).write_text(text)
    print(text)
    return 0 if all(o == "ok" for o in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
