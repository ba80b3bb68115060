"""Benchmark: host memory of loading and iterating data latents does not grow with their size on disk.

    python tests/benchmark_memory.py                          # 1x and 4x of 320 rows of [128..256, 1024] float32
    python tests/benchmark_memory.py --rows 500 --hidden 3584 # Qwen2.5-7B width (1x: ~1.4 GB on disk)

Writes two hidden-state datasets with `save_to_disk` (`task_id`, `hidden_state` `[L, H]` float32 with L
drawn in [--min_length, --max_length], `plan`), the second with `--scale` times the rows, then measures
each in a fresh subprocess running the training tool's own path over every row: `HiddenStateStore` (the
id -> row map), `check_hidden_states` (reads and checks every latent once, as validation does before any
weights load), a `LatentCommDataset` over all rows iterated through a `DataLoader` with the tool's
collator, in `--epochs` passes.

It reports, per size: peak RSS (VmHWM), the peak of anonymous RSS (RssAnon, sampled every batch: the
process's own heap, which cannot be paged out) and file-backed RSS at the end (RssFile: pages of the
memory-mapped Arrow files that were read, shared with the page cache and dropped by the kernel under
memory pressure). Each figure is also given net of the same process after its imports. Not collected by
pytest (the file name does not start with `test_`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]


def proc_status() -> dict[str, int]:
    """Memory lines of /proc/self/status in MiB."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            values[key] = int(rest.split()[0]) / 1024
    return values


def write_dataset(path: Path, rows: int, hidden: int, min_length: int, max_length: int, seed: int) -> float:
    """Write `rows` hidden states with `save_to_disk`, a shard at a time; returns the size on disk in MiB."""
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    datasets.disable_progress_bars()
    rng = np.random.default_rng(seed)
    features = datasets.Features(
        {
            "task_id": datasets.Value("string"),
            "hidden_state": datasets.List(datasets.List(datasets.Value("float32"))),
            "plan": datasets.Value("string"),
        }
    )
    parts, tmp_dirs = [], []
    for start in range(0, rows, 64):  # 64 rows (at most ~64 MiB at H=1024) in memory at a time
        n = min(64, rows - start)
        lengths = rng.integers(min_length, max_length + 1, size=n)
        values = rng.standard_normal(int(lengths.sum()) * hidden, dtype=np.float32)
        inner = pa.ListArray.from_arrays(np.arange(0, len(values) + 1, hidden, dtype=np.int32), pa.array(values))
        outer = pa.ListArray.from_arrays(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32), inner)
        table = pa.table(
            {
                "task_id": [f"task-{start + i}" for i in range(n)],
                "hidden_state": outer,
                "plan": ["1. go to the countertop 2. take the mug"] * n,
            }
        )
        tmp = Path(tempfile.mkdtemp(dir=path.parent))
        datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=features)).save_to_disk(str(tmp))
        tmp_dirs.append(tmp)
        parts.append(datasets.load_from_disk(str(tmp)))
    datasets.concatenate_datasets(parts).save_to_disk(str(path), max_shard_size="500MB")
    for tmp in tmp_dirs:
        shutil.rmtree(tmp)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def measure(path: str, K: int, epochs: int, batch_size: int) -> dict:
    """Run in a fresh process: the tool's loading and iteration path over every row; memory figures in MiB."""
    sys.path.insert(0, str(REPO_ROOT))
    import torch

    import train_latent_comm as tlc

    after_imports = proc_status()
    start = time.time()
    store = tlc.HiddenStateStore(path)
    conversations = [tlc.Conversation(key, [("user", "q"), ("assistant", "a")]) for key in store.row_of]
    hidden_size = store.read(0).shape[1]
    problems = tlc.ProblemLog()
    kept = tlc.check_hidden_states(conversations, store, hidden_size, problems)
    assert len(kept) == len(store) and not problems, problems.summary()
    peak_anon = proc_status()["RssAnon"]
    samples = [
        tlc.EncodedSample(
            record_id=conv.id,
            hidden_row=store.row_of[conv.id],
            input_ids=np.arange(32, dtype=np.int32),
            supervised=np.arange(32) >= 16,
            insert_pos=8,
            student_input_ids=np.arange(16, dtype=np.int32),
        )
        for conv in kept
    ]
    dataset = tlc.LatentCommDataset(samples, store, K)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, collate_fn=tlc.LatentCommCollator(0, 0)
    )
    checksum, seen = 0.0, 0
    for _ in range(epochs):
        for batch in loader:
            assert batch["data_latents"].shape[1:] == (K, hidden_size)
            checksum += float(batch["data_latents"][:, 0, 0].sum())
            seen += batch["data_latents"].shape[0]
            peak_anon = max(peak_anon, proc_status()["RssAnon"])
    end = proc_status()
    return {
        "rows": len(store),
        "samples_seen": seen,
        "seconds": round(time.time() - start, 1),
        "peak_rss": end["VmHWM"],
        "peak_anon": peak_anon,
        "file_rss_end": end["RssFile"],
        "imports_rss": after_imports["VmRSS"],
        "imports_anon": after_imports["RssAnon"],
        "checksum": checksum,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=320, help="rows of the 1x dataset")
    parser.add_argument("--scale", type=int, default=4, help="the second dataset has this many times the rows")
    parser.add_argument("--hidden", type=int, default=1024, help="H, the teacher width")
    parser.add_argument("--min_length", type=int, default=128, help="shortest L")
    parser.add_argument("--max_length", type=int, default=256, help="longest L")
    parser.add_argument("--K", type=int, default=128, help="latent rows read per sample")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the dataset")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--workdir", default=None, help="where the datasets go (default: a temp dir, removed)")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: the child process
    args = parser.parse_args()

    if args.measure:
        print(json.dumps(measure(args.measure, args.K, args.epochs, args.batch_size)))
        return

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="latent_memory_"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for factor in (1, args.scale):
            path = workdir / f"hidden_{factor}x"
            started = time.time()
            disk = write_dataset(path, args.rows * factor, args.hidden, args.min_length, args.max_length, factor)
            written = time.time() - started
            command = [sys.executable, __file__, "--measure", str(path), "--K", str(args.K),
                       "--epochs", str(args.epochs), "--batch_size", str(args.batch_size)]  # fmt: skip
            env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                sys.exit(f"measurement of {path} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result.update(factor=factor, disk=disk, write_seconds=round(written, 1))
            results.append(result)
            shutil.rmtree(path)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"hidden_state [L in {args.min_length}..{args.max_length}, H={args.hidden}] float32, K={args.K}, "
          f"{args.epochs} epochs, batch {args.batch_size}; MiB")  # fmt: skip
    header = ("size", "rows", "on disk", "peak RSS", "net", "peak anon", "net", "file RSS end", "iterate s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in results:
        cells = (f"{r['factor']}x", r["rows"], f"{r['disk']:.0f}", f"{r['peak_rss']:.0f}",
                 f"{r['peak_rss'] - r['imports_rss']:.0f}", f"{r['peak_anon']:.0f}",
                 f"{r['peak_anon'] - r['imports_anon']:.0f}", f"{r['file_rss_end']:.0f}", r["seconds"])  # fmt: skip
        print("| " + " | ".join(str(c) for c in cells) + " |")
    small, large = results
    print(f"ratio {large['factor']}x / 1x: data on disk {large['disk'] / small['disk']:.2f}, "
          f"peak RSS {large['peak_rss'] / small['peak_rss']:.2f}, "
          f"peak anonymous RSS {large['peak_anon'] / small['peak_anon']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
