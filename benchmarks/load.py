"""Load-time benchmark: a packaged GGUF preset loaded cold, then from the specqa cache.

    python -m benchmarks.load                       # SmolLM2-135M-Instruct, 3 fresh processes
    python -m benchmarks.load --preset gemma3-270m --repeats 5

Every load runs in a fresh child process, as a user's `python evaluate.py` does, with
SPECQA_CACHE_DIR pointing at a new temporary folder, so the first load really
dequantizes the GGUF file and writes the cache entry. The measured loads are:

- first: `load_model` on an empty cache (dequantize, write and hash the entry);
- again in the same process: a second `load_model` in that child, with every module
  already imported;
- second, in fresh processes (`--repeats` of them): `load_model` on the cached entry,
  timed from after `import experiments.models` (which imports torch) to the loaded
  model. The median counts;
- import floor: in a fresh process, after the same import, only importing the
  transformers modules that this architecture's `from_pretrained` needs. No cached
  load in a fresh process can take less.

The JSON goes to `--out` (by default the committed benchmarks/results/load.json, so a
run shows up in `git status`), and the last line is
`first_load_s=... second_load_s=... second_in_process_s=... import_floor_s=...`.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def child_main(mode: str, preset: str) -> None:
    """Run in a child process: time one kind of load and print a JSON line."""
    started = time.perf_counter()
    from experiments.fetch import compose_preset_config
    from experiments.models import _import_loader_modules, dequantized_folder, load_model

    imported = time.perf_counter()
    config = compose_preset_config(preset)
    result = {"import_s": imported - started}
    if mode == "floor":
        folder = dequantized_folder(config)  # cached by the parent's first load
        began = time.perf_counter()
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

        _import_loader_modules(folder)
        result["floor_s"] = time.perf_counter() - began
    else:
        began = time.perf_counter()
        load_model(config)
        result["load_s"] = time.perf_counter() - began
        if mode == "first":
            began = time.perf_counter()
            load_model(config)
            result["again_s"] = time.perf_counter() - began
    print("SPECQA-LOAD " + json.dumps(result), flush=True)


def run_child(mode: str, preset: str, cache: Path) -> dict:
    command = [sys.executable, "-m", "benchmarks.load", "--child", mode, "--preset", preset]
    env = {**os.environ, "SPECQA_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - started
    lines = [line for line in completed.stdout.splitlines() if line.startswith("SPECQA-LOAD ")]
    if completed.returncode != 0 or not lines:
        tail = "\n".join(completed.stderr.strip().splitlines()[-10:])
        raise SystemExit(f"error: the {mode} load of {preset} failed (exit {completed.returncode}):\n{tail}")
    return {**json.loads(lines[-1].removeprefix("SPECQA-LOAD ")), "process_wall_s": wall}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="smollm2-135m-instruct",
                        help="packaged model preset in config/model (default: smollm2-135m-instruct)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes that load from the cache (default: 3)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results" / "load.json",
                        help="where the JSON record goes")
    parser.add_argument("--child", choices=("first", "second", "floor"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        child_main(args.child, args.preset)
        return 0

    load_average_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="specqa-load-cache-") as cache:
        print(f"cache folder for this run: {cache}", flush=True)
        first = run_child("first", args.preset, Path(cache))
        print(f"first load {first['load_s']:.2f} s, again in that process {first['again_s']:.2f} s", flush=True)
        seconds = []
        for index in range(args.repeats):
            seconds.append(run_child("second", args.preset, Path(cache)))
            print(f"[{index + 1}/{args.repeats}] second load in a fresh process {seconds[-1]['load_s']:.2f} s "
                  f"(import of experiments.models {seconds[-1]['import_s']:.2f} s, "
                  f"process {seconds[-1]['process_wall_s']:.2f} s)", flush=True)
        floor = run_child("floor", args.preset, Path(cache))

    second_loads = [run["load_s"] for run in seconds]
    summary = {
        "first_load_s": round(first["load_s"], 3),
        "second_load_s": round(statistics.median(second_loads), 3),
        "second_load_max_s": round(max(second_loads), 3),
        "second_in_process_s": round(first["again_s"], 3),
        "import_floor_s": round(floor["floor_s"], 3),
    }
    record = {
        "preset": args.preset,
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.load " + " ".join(argv if argv is not None else sys.argv[1:]),
        "load_average_1min_start": load_average_start,
        "load_average_1min_end": os.getloadavg()[0],
        "summary": summary,
        "first": first,
        "second": seconds,
        "floor": floor,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")
    print(" ".join(f"{key}={value:.2f}" for key, value in summary.items() if key != "second_load_max_s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
