"""Peak memory of merging two copies of the real SmolLM2-135M (fp32, ≈540 MB each): our
streaming merge against the naive load-everything approach, each in its own subprocess.

    .venv/bin/python benchmarks/merge.py [--method slerp] [--keep DIR]

The second model is the embedded model plus seeded Gaussian noise (σ = 0.5·std of each
tensor, so most matrices take the spherical path), written once into a temporary folder.
Every worker pins torch to one thread and reports its peak resident memory
(`resource.getrusage(...).ru_maxrss`, cross-checked with /proc's VmHWM); `baseline` only
imports torch, safetensors and exnihilo.merge, so "above baseline" is what the merge itself
costs. The naive worker reads both models completely (`safetensors.torch.load_file`),
merges every tensor with the same functions and saves the dict with `save_file`. The two
outputs are compared tensor by tensor. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

MODEL = "smollm2-135m-instruct"


def peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def vm_hwm_mb() -> float:
    """Linux's per-address-space peak (VmHWM), a cross-check of ru_maxrss."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_second_model(base: Path, target: Path, seed: int = 0) -> None:
    """The base plus small seeded noise, written tensor by tensor (so this step is cheap)."""
    import shutil

    import torch

    from exnihilo.merge.shards import ShardWriter, read_header_index, read_tensor

    index = read_header_index(base)
    target.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    with ShardWriter(target, [(n, i.shape, i.dtype) for n, i in index.items()]) as writer:
        for name, info in index.items():
            t = read_tensor(info, name)
            noise = torch.randn(t.shape, generator=g) * (0.5 * t.float().std().item() + 1e-6)
            writer.write(name, (t.float() + noise).to(t.dtype))
    shutil.copy2(base / "config.json", target / "config.json")


def config_text(method: str, a: Path, b: Path) -> str:
    if method == "slerp":
        return (f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n"
                f"  - model: {b}\nparameters: {{t: 0.5}}\n")
    return (f"merge_method: {method}\nbase_model: {a}\nmodels:\n"
            f"  - {{model: {b}, parameters: {{weight: 1.0, density: 0.5}}}}\n"
            f"  - {{model: {a}, parameters: {{weight: 1.0}}}}\n")


def worker(mode: str, method: str, a: Path, b: Path, out: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    import safetensors.torch  # noqa: F401  (imported by both real workers)

    import exnihilo.merge  # noqa: F401

    started = time.perf_counter()
    if mode == "baseline":
        pass
    elif mode == "streaming":
        from exnihilo.merge import merge

        config = out.parent / f"{out.name}.yaml"
        config.write_text(config_text(method, a, b))
        merge(config, out)
    elif mode == "naive":
        naive_merge(method, a, b, out)
    else:
        raise SystemExit(f"unknown mode {mode}")
    return {"mode": mode, "peak_rss_mb": round(peak_mb(), 1),
            "vm_hwm_mb": round(vm_hwm_mb(), 1),
            "seconds": round(time.perf_counter() - started, 2)}


def naive_merge(method: str, a: Path, b: Path, out: Path) -> None:
    """Load both state dicts whole, merge every tensor, save the whole result at once."""
    import shutil

    from safetensors.torch import load_file, save_file

    from exnihilo.merge import methods

    sa, sb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    merged = {}
    for name in sa:
        if method == "slerp":
            merged[name] = methods.slerp(0.5, sa[name], sb[name]).to(sa[name].dtype)
        elif method == "linear":
            merged[name] = methods.linear([sb[name], sa[name]], [1.0, 1.0])
        elif method == "task_arithmetic":
            merged[name] = methods.task_arithmetic(sa[name], [sb[name]], [1.0])
        else:
            merged[name] = methods.ties(sa[name], [sb[name]], [1.0], [0.5])
    out.mkdir()
    save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy2(a / "config.json", out / "config.json")


def helper(args: list[str]) -> dict:
    """Run this script with `args` in a fresh process; return its last JSON line."""
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_worker(mode: str, method: str, a: Path, b: Path, out: Path) -> dict:
    return helper(["--worker", mode, "--method", method, "--a", str(a), "--b", str(b),
                   "--out", str(out)])


def compare(x: Path, y: Path) -> float:
    from safetensors.torch import load_file

    sx, sy = load_file(str(x / "model.safetensors")), load_file(str(y / "model.safetensors"))
    assert sx.keys() == sy.keys()
    return max((sx[k].float() - sy[k].float()).abs().max().item() for k in sx)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="slerp",
                        choices=["slerp", "linear", "task_arithmetic", "ties"])
    parser.add_argument("--worker")
    parser.add_argument("--a", type=Path)
    parser.add_argument("--b", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", type=Path, help="Keep the work folder here (default: temp).")
    args = parser.parse_args()
    if args.worker == "setup":  # resolve the model, write the noisy copy
        from exnihilo.models import resolve_model

        base = resolve_model(MODEL)
        if not args.b.exists():
            make_second_model(base, args.b)
        print(json.dumps({"base": str(base)}))
        return
    if args.worker == "compare":
        print(json.dumps({"max_abs_diff": compare(args.a, args.b)}))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.method, args.a, args.b, args.out)))
        return

    # This parent imports nothing heavy: Linux carries the parent's peak RSS over fork+exec
    # into the child's ru_maxrss, so a parent holding torch and a model would inflate every
    # worker's figure.
    work_ctx = tempfile.TemporaryDirectory(prefix="merge-bench-")
    work = args.keep or Path(work_ctx.name)
    work.mkdir(parents=True, exist_ok=True)
    second = work / "noisy"
    base = Path(helper(["--worker", "setup", "--b", str(second)])["base"])
    size_mb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**20
    results = {}
    for mode in ("baseline", "streaming", "naive"):
        out = work / f"out-{mode}-{args.method}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        results[mode] = run_worker(mode, args.method, base, second, out)
    floor = results["baseline"]["peak_rss_mb"]
    report = {
        "model": MODEL, "method": args.method, "model_file_mb": round(size_mb, 1),
        "threads": 1, "baseline_rss_mb": floor,
        "streaming": {**results["streaming"],
                      "above_baseline_mb": round(results["streaming"]["peak_rss_mb"] - floor, 1)},
        "naive": {**results["naive"],
                  "above_baseline_mb": round(results["naive"]["peak_rss_mb"] - floor, 1)},
        "naive_over_streaming_above_baseline": round(
            (results["naive"]["peak_rss_mb"] - floor)
            / max(1.0, results["streaming"]["peak_rss_mb"] - floor), 2),
        "max_abs_diff_streaming_vs_naive": helper(
            ["--worker", "compare", "--a", str(work / f"out-streaming-{args.method}"),
             "--b", str(work / f"out-naive-{args.method}")])["max_abs_diff"],
    }
    print(json.dumps(report, indent=2))
    work_ctx.cleanup()


if __name__ == "__main__":
    main()
