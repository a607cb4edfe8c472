"""A resumable runner for experiments made of many `parscale train` runs on one machine's GPUs.

An experiment (e.g. streams_effect/runs.py) defines its runs as {name: {"arm", "seed", "cost", "train":
TrainConfig fields, optional "after": the run whose final checkpoint this one continues}} and writes each
run's settings as configs/{name}.toml (toml_text); `run_all` trains those matching a pattern that have no
result yet, `per_gpu` at a time on every visible GPU, largest cost first, each as its own worker process
(`python experiments/runner.py one SPEC`: `parscale train`, then `parscale streams` and, where the work folder
holds heldout.jsonl, `parscale eval` per held-out package, then the run's result.json), and copies each result
to the experiment's results/{name}.json. A stage-2 run waits for its stage 1 on the same machine and brings it
along when its checkpoint is not there (select_runs). Stopped by SIGTERM (a time limit), trainers write a
checkpoint; started again over the same work folder the runner continues them bit-exact, and collects a run
that finished training but was never collected without training it again.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def toml_text(fields: dict) -> str:
    """TrainConfig fields as a `parscale train --config` file."""
    def value(v):
        return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v)

    plain = [f"{k} = {value(v)}" for k, v in fields.items() if not isinstance(v, dict)]
    tables = [f"\n[{k}]\n" + "\n".join(f"{kk} = {value(vv)}" for kk, vv in v.items())
              for k, v in fields.items() if isinstance(v, dict)]
    return "\n".join(plain) + "".join(tables) + "\n"



# The held-out packages' files whose copies under another name are training files (the same project published
# twice; README, "The held-out set, audited"): a held-out path containing the key is a twin when the path with
# the key replaced by the value is a training path.
TWIN_PATHS = {"/lightning/pytorch/": "/pytorch_lightning/", "/lightning/fabric/": "/lightning_fabric/"}


def write_heldout(corpus: Path, out: Path) -> dict:
    """The corpus's held-out rows as one JSONL for `parscale eval`, each row's "domain" its package, with
    " [twin]" appended for a file with a training twin: the evaluation then reports every package, twins
    apart. Returns {domain: files}."""
    rows = [json.loads(line) for line in corpus.read_text().splitlines() if line.strip()]
    train_paths = {r["path"] for r in rows if r["split"] == "train"}
    counts: dict[str, int] = {}
    lines = []
    for r in rows:
        if r["split"] != "val":
            continue
        twin = any(key in r["path"] and r["path"].replace(key, value, 1) in train_paths
                   for key, value in TWIN_PATHS.items())
        domain = r["package"] + (" [twin]" if twin else "")
        counts[domain] = counts.get(domain, 0) + 1
        lines.append(json.dumps({"text": r["text"], "domain": domain}))
    out.write_text("\n".join(lines) + "\n")
    return counts


def heldout_summary(domains: dict) -> dict:
    """Loss per package (twins included), and overall with and without the twin files, from the domains of
    `parscale eval` (token-weighted); bits per byte beside it where eval gives it (a measure that does not
    depend on the tokenizer: each domain's bytes are its nats / ln 2 / its bits per byte)."""
    def pooled(keys):
        tokens = sum(domains[k]["tokens"] for k in keys)
        nats = sum(domains[k]["loss"] * domains[k]["tokens"] for k in keys)
        out = {"tokens": tokens, "loss": nats / tokens}
        if all(domains[k].get("bits_per_byte") for k in keys):
            n_bytes = sum(domains[k]["loss"] * domains[k]["tokens"] / math.log(2) / domains[k]["bits_per_byte"]
                          for k in keys)
            out["bits_per_byte"] = nats / math.log(2) / n_bytes
        return out

    packages = sorted({k.removesuffix(" [twin]") for k in domains})
    return {"packages": {p: pooled([k for k in domains if k.removesuffix(" [twin]") == p]) for p in packages},
            "all": pooled(list(domains)), "without_twins": pooled([k for k in domains if not k.endswith("[twin]")])}


def collect(name: str, run: dict, run_dir: Path, wall: float) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    full = [(r["step"], r["val_loss_full"]) for r in rows if "val_loss_full" in r]
    tail = rows[-max(1, len(rows) // 20):]
    streams_file = run_dir / "streams.json"
    heldout_file = run_dir / "heldout.json"
    import torch

    return {
        "run": name, "arm": run["arm"], "seed": run["seed"], "settings": run["train"],
        "val_loss_full": dict(full), "endpoint": statistics.fmean(v for _, v in full),
        "train_loss_final": statistics.fmean(r["loss"] for r in tail),
        "eval_curve": [{"step": r["step"], "val_loss": r["val_loss"], **({"streams": r["streams"]} if "streams" in r
                                                                          else {})} for r in rows if "val_loss" in r],
        "loss_curve": [[r["step"], r["loss"]] for r in rows[::20]],
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in rows[len(rows) // 10:]),
        "wall_seconds": wall,
        # the trainer's own high-water mark (CUDA only): how many runs can share one card
        "peak_memory_gib": max((r["peak_memory_gib"] for r in rows if "peak_memory_gib" in r), default=None),
        "streams_final": json.loads(streams_file.read_text()) if streams_file.is_file() else None,
        "heldout_by_package": (heldout_summary(json.loads(heldout_file.read_text())["domains"])
                               if heldout_file.is_file() else None),
        "environment": {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                        "torch": torch.__version__, "python": platform.python_version()},
    }


AGAIN = "stage1_again"   # results/stage1_again/: stage-1 runs trained again on a later machine for stage 2
RUNS_AGAIN = "again"     # results/again/: runs with a committed result trained again because `again` named them


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatch(name, pat) for pat in patterns)


def select_runs(all_runs: dict[str, dict], only: list[str], results: Path, work: Path,
                again: list[str] = ()) -> dict[str, dict]:
    """The runs to train: those matching a pattern without a result in `results`, plus the stage 1 of each
    stage-2 run among them when its folder (its checkpoint) is not in `work`. A stage-2 run continues a
    checkpoint that lives only on the machine that trained it, so a stage 1 whose result is already committed
    is trained again, marked "again" (its result goes to results/stage1_again/, the committed one stays).

    A run matching a pattern of `again` too is trained even where it has a committed result: a stage-2 control
    whose committed result continued an earlier training of stage 1 pairs with nothing of a new one. Its "again"
    names results/again/, where its new result goes beside the committed one (never over it)."""
    todo = {}
    for name, run in all_runs.items():
        if not _matches(name, only):
            continue
        committed = (results / f"{name}.json").is_file()
        if not committed:
            todo[name] = run
        elif _matches(name, again):
            todo[name] = {**run, "again": RUNS_AGAIN}
    for name in list(todo):
        after = todo[name].get("after")
        if after and after not in todo and after in all_runs and not (work / after / "result.json").is_file():
            todo[after] = {**all_runs[after], "again": AGAIN if (results / f"{after}.json").is_file() else False}
    return todo


def run_one(spec_file: Path, data: Path, work: Path) -> int:
    """Train one run (continuing its checkpoint if it has one), measure its streams, score the held-out packages
    (when work/heldout.jsonl exists) and write work/{name}/result.json; the exit status of the first step that
    failed, else 0. The runner starts this as one process per run (the run and its config file named in
    spec_file, which the runner writes), so its scheduling never waits on them."""
    from parscale.training.run_folder import latest_checkpoint

    t0 = time.time()
    spec = json.loads(spec_file.read_text())
    name, run = spec["name"], spec["run"]
    seq_len = run["train"]["seq_len"]
    run_dir, env = work / name, {**os.environ, "PYTHONUNBUFFERED": "1"}
    device = "cuda" if os.environ.get("CUDA_VISIBLE_DEVICES", "") != "" else "cpu"
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None or int(ckpt.name.removeprefix("step-")) < run["train"]["steps"]:
        # A run stopped by SIGTERM (the runner's time limit) wrote a checkpoint: continue it, bit-exact.
        cmd = [sys.executable, "-m", "parscale.cli", "train", "--config", spec["config"],
               "--data", str(data), "--out", str(run_dir), "--resume" if ckpt else "--overwrite"]
        if run.get("after"):
            cmd += ["--model", str(work / run["after"])]
        code = subprocess.run(cmd, env=env, check=False).returncode
        if code != 0:
            return code
    subprocess.run([sys.executable, "-m", "parscale.cli", "streams", "--model", str(run_dir), "--data", str(data),
                    "--batches", "16", "--batch-size", "16", "--seq-len", str(seq_len), "--device", device,
                    "--out", str(run_dir / "streams.json")], env=env, check=False, stdout=subprocess.DEVNULL)
    heldout = work / "heldout.jsonl"
    if heldout.is_file() and run.get("corpus") is None:  # the default corpus's packages apart (write_heldout)
        subprocess.run([sys.executable, "-m", "parscale.cli", "eval", "--model", str(run_dir), "--data", str(heldout),
                        "--max-length", str(seq_len), "--batch-size", "32", "--device", device, "--out",
                        str(run_dir / "heldout.json")], env=env, check=False, stdout=subprocess.DEVNULL)
    result = collect(name, run, run_dir, time.time() - t0)
    if run.get("after"):
        result["stage1"] = stage1_identity(work / run["after"])
    write_atomic(run_dir / "result.json", json.dumps(result, indent=1) + "\n")
    return 0


def again_path(folder: Path, name: str) -> Path:
    """Where a stage 1 trained again is published: {name}.json, or {name}.again-{k}.json when an earlier
    re-training is already there (each is the start of the stage-2 runs that recorded its identity; none is
    replaced)."""
    path, k = folder / f"{name}.json", 2
    while path.exists():
        path, k = folder / f"{name}.again-{k}.json", k + 1
    return path


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: a process killed midway leaves no half file (a
    result.json is what marks a run as done)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def stage1_identity(stage1_dir: Path) -> dict:
    """Which stage-1 checkpoint a stage-2 run continued: the stage-1 run's last whole-split loss and the sha256 of
    its final weights. Stage-2 runs of one seed are compared only when these agree (the same recipe trained on
    another machine gives another checkpoint)."""
    import hashlib

    from parscale.training.run_folder import latest_checkpoint

    rows = [json.loads(line) for line in (stage1_dir / "metrics.jsonl").read_text().splitlines()]
    full = [r for r in rows if "val_loss_full" in r]
    weights = latest_checkpoint(stage1_dir) / "model" / "model.safetensors"
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"run": stage1_dir.name, "step": full[-1]["step"], "val_loss_full": full[-1]["val_loss_full"],
            "weights_sha256": digest.hexdigest()}


def run_all(all_runs: dict[str, dict], configs: Path, results: Path, data: Path, work: Path, only: list[str],
            per_gpu: int, heldout_corpus: Path | None = None, corpus_data: dict[str, Path] | None = None,
            again: list[str] = ()) -> None:
    """Train the runs matching `only` (largest cost first, per_gpu at a time on every visible GPU). A run on
    another corpus than the default one names it (run["corpus"]) and reads the `parscale data` folder given for
    that name in corpus_data; the held-out packages (heldout_corpus) are the default corpus's and score only
    runs on it."""
    import torch

    results.mkdir(exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    heldout = work / "heldout.jsonl"
    if heldout_corpus is not None and not heldout.is_file():
        print(f"[runs] held-out files by package: {write_heldout(heldout_corpus, heldout)}", flush=True)
    todo = select_runs(all_runs, only, results, work, again)
    queue = sorted(todo, key=lambda n: -todo[n]["cost"])
    gpus = list(range(max(1, torch.cuda.device_count()))) if torch.cuda.is_available() else [None]
    slots = {g: [] for g in gpus}
    print(f"[runs] {len(queue)} runs on GPUs {gpus}, {per_gpu} per GPU", flush=True)

    # How many runs shared each run's GPU, time-weighted over what this runner saw of it: a run's wall_seconds
    # over this mean is its share of the GPU's time (the GPU-seconds the arms' costs are compared in).
    shared: dict[str, list[float]] = {}   # name -> [seconds seen, run-seconds on its GPU]
    clock = time.monotonic()

    def publish(name: str, how: str) -> None:
        if name in shared and shared[name][0] > 0:   # written into the run's own result, so a later collection of
            seen, weighted = shared.pop(name)         # the same folder publishes the same text
            result = json.loads((work / name / "result.json").read_text())
            result["gpu_sharing"] = {"seconds_seen": seen, "mean_runs_on_gpu": weighted / seen}
            write_atomic(work / name / "result.json", json.dumps(result, indent=1) + "\n")
        text = (work / name / "result.json").read_text()
        folder = todo[name].get("again")
        if folder:   # trained again (a stage 1 for its checkpoint, or named by `again`): the committed one stays
            (results / folder).mkdir(exist_ok=True)
            # A later call on the same machine finds the run's folder finished and collects it again: the same
            # result is published once.
            if not any(f.read_text() == text for f in (results / folder).glob(f"{name}.*json")):
                write_atomic(again_path(results / folder, name), text)
        else:
            write_atomic(results / f"{name}.json", text)
        result = json.loads(text)
        print(f"[runs] {how} {name}: endpoint {result['endpoint']:.4f}, {result['wall_seconds']:.0f} s, "
              f"{result['tokens_per_s_median']:,.0f} tok/s", flush=True)

    while queue or any(slots.values()):
        now = time.monotonic()
        for g in gpus:
            for _, name in slots[g]:
                seen = shared.setdefault(name, [0.0, 0.0])
                seen[0] += now - clock
                seen[1] += (now - clock) * len(slots[g])
        clock = now
        for g in gpus:
            for proc, name in list(slots[g]):
                if proc.poll() is None:
                    continue
                slots[g].remove((proc, name))
                if proc.returncode != 0:
                    tail = (work / f"{name}.log").read_text(errors="replace").strip().splitlines()[-3:]
                    print(f"[runs] FAILED {name} (exit {proc.returncode}); see {work / name}.log:\n    "
                          + "\n    ".join(tail), flush=True)
                    continue
                publish(name, "done")
            waiting = []
            while queue and len(slots[g]) < per_gpu:
                name = queue.pop(0)
                after = todo[name].get("after")
                if after and not (work / after / "result.json").is_file():
                    if any(after == n for n in queue + waiting) or any(after == n for _, n in
                                                                        sum(slots.values(), [])):
                        waiting.append(name)  # stage 1 is still to come on this machine
                    else:
                        print(f"[runs] skip {name}: it continues {after}, which has not run on this machine "
                              f"(--work {work}); include it in the patterns", flush=True)
                    continue
                if (work / name / "result.json").is_file():   # finished under a runner that was stopped
                    publish(name, "collected from its run folder")
                    continue
                corpus = todo[name].get("corpus")
                if corpus is not None and corpus not in (corpus_data or {}):
                    print(f"[runs] skip {name}: it trains on the {corpus} corpus; give its data folder with "
                          f"--corpus-data {corpus}=DIR", flush=True)
                    continue
                spec = work / f"{name}.spec.json"
                spec.write_text(json.dumps({"name": name, "run": todo[name],
                                            "config": str(configs / f"{name}.toml")}) + "\n")
                run_data = data if corpus is None else corpus_data[corpus]
                cmd = [sys.executable, str(Path(__file__).resolve()), "one", str(spec), "--data", str(run_data),
                       "--work", str(work)]
                visible = {} if g is None else {"CUDA_VISIBLE_DEVICES": str(g)}
                log = open(work / f"{name}.log", "a")
                proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1", **visible}, stdout=log,
                                        stderr=subprocess.STDOUT)
                slots[g].append((proc, name))
                print(f"[runs] start {name}" + ("" if g is None else f" on GPU {g}"), flush=True)
            queue[:0] = waiting
        time.sleep(2)


def write_configs(all_runs: dict[str, dict], configs: Path) -> None:
    configs.mkdir(exist_ok=True)
    for name, run in all_runs.items():
        (configs / f"{name}.toml").write_text(toml_text(run["train"]))


def experiment_main(argv, description: str, runs, configs: Path, results: Path, run_all, data_help: str,
                    per_gpu: int) -> None:
    """An experiment's command line: `configs` (write configs/*.toml), `list` (each run, done or not) and `run`
    (run_all over the runs matching --only). runs and run_all are the experiment's own functions."""
    ap = argparse.ArgumentParser(description=description)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("configs")
    sub.add_parser("list")
    r = sub.add_parser("run")
    r.add_argument("--data", required=True, help=data_help)
    r.add_argument("--work", required=True, help="where run folders and logs go")
    r.add_argument("--only", nargs="+", default=["*"], help="run-name patterns")
    r.add_argument("--again", nargs="+", default=[], metavar="PATTERN",
                   help="of those, train these again even where a result is committed (the new result goes to "
                        "results/again/, beside it): controls that must continue this machine's stage 1")
    r.add_argument("--per-gpu", type=int, default=per_gpu)
    r.add_argument("--heldout-corpus", type=Path, default=None,
                   help="the corpus JSONL: score every held-out package of each finished run apart (heldout.json)")
    r.add_argument("--corpus-data", action="append", default=[], metavar="NAME=DIR",
                   help="the `parscale data` folder of another corpus, for the runs that name it (repeatable)")
    args = ap.parse_args(argv)
    if args.cmd == "configs":
        write_configs(runs(), configs)
    elif args.cmd == "list":
        for name in runs():
            print(name, "done" if (results / f"{name}.json").is_file() else "-")
    else:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        corpus_data = {}
        for item in args.corpus_data:
            name, sep, folder = item.partition("=")
            if not sep or not name or not folder:
                ap.error(f"--corpus-data wants NAME=DIR, got {item!r}")
            corpus_data[name] = Path(folder)
        run_all(Path(args.data), Path(args.work), args.only, args.per_gpu, args.heldout_corpus, corpus_data,
                args.again)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="one run of an experiment: train, measure, write result.json")
    sub = ap.add_subparsers(dest="cmd", required=True)
    one = sub.add_parser("one", help="train and measure one run (run_all starts one such process per run)")
    one.add_argument("spec", type=Path, help="the run's spec file, written by run_all")
    one.add_argument("--data", required=True)
    one.add_argument("--work", required=True)
    args = ap.parse_args(argv)
    sys.exit(run_one(args.spec, Path(args.data), Path(args.work)))


if __name__ == "__main__":
    main()
