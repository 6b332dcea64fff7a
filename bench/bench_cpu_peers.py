"""Ours against onnxruntime-genai, OpenVINO GenAI and llama.cpp on the CPU, same checkpoint, same request, interleaved.

  python bench/bench_cpu_peers.py [--rounds 3] [--systems ours-fp32,llamacpp-q4_0,...] [--skip-build]
                                  [--cache DIR] [--checkpoint DIR] [--out FILE.md]

Not part of CI (issue 24). Workload: bench/make_random_checkpoint.py's Qwen3-VL-2B shapes cut to 8 text / 8 vision
layers (random weights, real tokenizer); matplotlib's sample photo grace_hopper.jpg (read from the matplotlib wheel,
no install) cropped to 448x448 without resampling (every system's smart resize is then the identity: 196 image
tokens); "Describe this image."; 64 greedy tokens, EOS ignored; 2 threads everywhere.

Build (cached under --cache, default ~/.cache/qwen-vl-trt-bench, keyed by the checkpoint's hash, so a rerun costs
only the timed runs; `--skip-build` refuses to build and says what is missing):
- each peer in its own pinned venv (`PEERS` below), never the project's;
- ours: export_all --dtype fp32 --no-engines, dense, --weights int4 (block 128; run with fp32 activations and, as
  trt-run --int4-activations int8, with int8 ones) and --weights int4 --int4-block-size 32;
- onnxruntime-genai: its model builder (decoder; fp32, and int4 with its defaults: block 32, int8 activations,
  lm_head int4) plus bench/cpu_peers/oga_graphs.py (vision / embedding graphs in its Qwen3-VL contract);
- OpenVINO: `optimum-cli export openvino` fp32, and int4 (sym, group 128, ratio 1.0; lm_head / embeddings /
  vision int8 by optimum-intel's default);
- llama.cpp: llama-cpp-python built from source (this CPU's ISA flags, AMX off: llama_cmake_args),
  convert_hf_to_gguf.py f32 (+ --mmproj f32),
  `llama_model_quantize` Q4_0.
- HF transformers fp32 `generate` on the checkpoint: the reference tokens.

Ours starts as trt-run does (runtime/startup.py: the three sessions created concurrently, the tokenizer loaded
alongside them); the INT4 exports' decoder is loaded from ONNX Runtime's optimized-model cache, which is on by
default on the CPU (ARTIFACTS/.ort-cache, runtime/backends/loader.py default_ort_cache): the warm-up round writes
it (one entry per MatMulNBits accuracy level: ours-int4 and ours-int4-a8 each have theirs in the one export's
cache), the timed rounds read
it; with --warmup 0 the first round of ours-int4 / ours-int4-a8 is a cold start.

Measure: a machine bandwidth roofline (best of several 2-thread streaming reads in numpy: BLAS gemv and a sum over
a 3 GiB array); then `--warmup` + `--rounds` rounds, each a quiet-machine check (CPU busy < 10 % over 1 s from
/proc/stat, waiting up to --quiet-wait s, else the round is marked busy) and one fresh process per system, the
systems' order rotated every round. Per run: start-up (spawn -> model ready), TTFT (request -> first token, image
reading and preprocessing included), decode tok/s ((n-1) / (last - first token)), peak RSS (wait4's ru_maxrss of
the process), tokens == HF. Reported: median and range (min-max) over the rounds, and decode as a fraction of the
roofline: bytes of weights a decode step reads (the decoder's weights from its graph / model files) x tok/s /
bandwidth.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RUNNERS = HERE / "cpu_peers"
sys.path.insert(0, str(HERE))
from benchlib import machine, utc_now  # noqa: E402

PROMPT = "Describe this image."
MARK = "BENCH_RESULT "
TORCH = "torch==2.13.0+cpu"  # the CPU wheel (the default one pulls CUDA libraries)
# Each peer's venv: exact pins (what issue 24's table was measured with).
PEERS = {
    "ortgenai": [TORCH, "onnxruntime-genai==0.18.0", "onnxruntime==1.32.0", "transformers==5.5.4", "onnx==1.23.2", "onnx-ir==1.1.0",
                 "numpy", "safetensors", "pillow"],
    "openvino": [TORCH, "optimum-intel==2.2.0", "openvino==2026.4.1", "openvino-genai==2026.4.1",
                 "openvino-tokenizers==2026.4.1", "nncf==3.4.0", "transformers==5.0.0", "numpy", "pillow"],
    "llama": ["llama-cpp-python==0.3.36", TORCH, "transformers==4.57.6", "sentencepiece", "protobuf<5", "numpy"],
}
# Removed after the install: the PyPI torchvision 0.28.0 that a dependency pulls in is built against the CUDA torch;
# with torch 2.13.0+cpu its ops do not load ("operator torchvision::nms does not exist") and transformers' import
# of PreTrainedModel fails inside optimum-cli. Without it the export runs (slow image processors, not used there).
PEERS_REMOVE = {"openvino": ["torchvision"]}
# llama.cpp's build: this CPU's instruction sets (from /proc/cpuinfo), AMX left out. With -DGGML_NATIVE=ON on a
# Sapphire Rapids VM (amx_int8 in cpuinfo) ggml puts the Q4_0 weights in its AMX buffer and every decode of the
# Q4_0 model segfaulted (rc -11, in eval; f32 ran); with use_extra_bufts=False it ran. Upstream: llama.cpp #20824
# (segfault in ggml_backend_amx_mul_mat, open) and #16315 (AMX Q4_0 results wrong). Its AVX-512 repack stays.
GGML_ISA = {"avx": "GGML_AVX", "avx2": "GGML_AVX2", "avx_vnni": "GGML_AVX_VNNI", "fma": "GGML_FMA",
            "f16c": "GGML_F16C", "bmi2": "GGML_BMI2", "avx512f": "GGML_AVX512", "avx512vbmi": "GGML_AVX512_VBMI",
            "avx512_vnni": "GGML_AVX512_VNNI", "avx512_bf16": "GGML_AVX512_BF16"}


def llama_cmake_args(cpuinfo: str = "/proc/cpuinfo") -> str:
    """-DGGML_NATIVE=OFF plus -DGGML_<ISA>=ON|OFF for each instruction set ggml can use, as this CPU has it."""
    flags = set()
    for line in Path(cpuinfo).read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    opts = [f"-D{opt}={'ON' if flag in flags else 'OFF'}" for flag, opt in GGML_ISA.items()]
    return " ".join(["-DGGML_NATIVE=OFF", *opts, "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"])
LLAMA_SDIST = "llama_cpp_python-0.3.36"


@dataclass
class System:
    name: str
    label: str
    venv: str | None  # None: the project's interpreter
    runner: str
    artifact: str  # relative to the checkpoint's cache dir
    options: dict = field(default_factory=dict)
    exact: bool = True  # expected token-exact with HF (reported either way)


CACHE = {"ort_cache": "ort-cache"}  # ONNX Runtime's optimized models (a full copy of each graph's weights on disk)
SYSTEMS = [
    System("ours-fp32", "ours fp32 (decoder.ort.onnx; qwen_vl::MatMulF32 on mapped weights)", None, "run_ours.py",
           "ours-dense"),
    System("ours-fp32-mlas", "ours fp32 `--dense-kernel mlas` (MLAS, prepacked)", None, "run_ours.py", "ours-dense",
           {"dense_kernel": "mlas"}),
    System("ours-fp32-mapped", "ours fp32 `--dense-kernel mlas --ort-weights mapped` (MLAS on mapped weights)", None,
           "run_ours.py", "ours-dense", {"prepack": "0", "dense_kernel": "mlas"}),
    # INT4: one export (block 128, model/weight_formats.py DEFAULT_INT4_BLOCK) run with either activation type (the
    # int8 run as trt-run --int4-activations int8), and block 32 (the finer, 18 % more bytes) with fp32 activations
    System("ours-int4", "ours `--weights int4`, fp32 activations (block 128; qwen_vl::MatMulInt4)", None,
           "run_ours.py", "ours-int4", exact=False),
    System("ours-int4-b32", "ours `--weights int4 --int4-block-size 32`, fp32 activations (qwen_vl::MatMulInt4)",
           None, "run_ours.py", "ours-int4-b32", exact=False),
    System("ours-int4-mlas", "ours `--weights int4 --int4-kernel mlas` (block 128; MatMulNBits level 1)", None,
           "run_ours.py", "ours-int4", {"int4_kernel": "mlas"}, exact=False),
    System("ours-int4-a8", "ours `--weights int4`, `--int4-activations int8` (block 128; MatMulNBits level 4)", None,
           "run_ours.py", "ours-int4", {"int4_activations": "int8"}, exact=False),
    System("ours-fp32-cached", "ours fp32, warm `--ort-cache` (all three graphs)", None, "run_ours.py",
           "ours-dense", CACHE),
    System("ours-int4-cached", "ours `--weights int4`, warm `--ort-cache` (all three graphs)", None, "run_ours.py",
           "ours-int4", CACHE, exact=False),
    System("ortgenai-fp32", "onnxruntime-genai 0.18 fp32", "ortgenai", "run_ortgenai.py", "ortgenai-fp32"),
    System("ortgenai-int4", "onnxruntime-genai int4 (block 32, int8 act., lm_head int4)", "ortgenai",
           "run_ortgenai.py", "ortgenai-int4", exact=False),
    System("openvino-fp32", "OpenVINO GenAI 2026.4.1 fp32", "openvino", "run_openvino.py", "openvino-fp32",
           {"precision": "f32"}),
    System("openvino-int4", "OpenVINO GenAI int4 (sym g128; lm_head int8)", "openvino", "run_openvino.py",
           "openvino-int4", exact=False),
    System("llamacpp-f32", "llama.cpp (llama-cpp-python 0.3.36) f32", "llama", "run_llamacpp.py",
           "llama/text-f32.gguf", {"mmproj": "llama/mmproj-f32.gguf"}),
    System("llamacpp-q4_0", "llama.cpp Q4_0", "llama", "run_llamacpp.py", "llama/text-q4_0.gguf",
           {"mmproj": "llama/mmproj-f32.gguf"}, exact=False),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(cmd: list, env: dict | None = None, cwd=None) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, env={**os.environ, **(env or {})}, cwd=cwd)


class MissingBuild(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------- build (cached)

class Builder:
    def __init__(self, cache: Path, ckpt: Path, skip: bool, threads: int):
        self.cache, self.ckpt, self.skip, self.threads = cache, ckpt, skip, threads
        self.key = checkpoint_hash(ckpt, cache / "checkpoint-hashes.json")
        self.dir = cache / "artifacts" / self.key[:16]
        self.dir.mkdir(parents=True, exist_ok=True)

    def need(self, what: str, path: Path) -> bool:
        """True when `path` must be built; with --skip-build a missing one is an error."""
        if path.exists():
            return False
        if self.skip:
            raise MissingBuild(f"--skip-build: {what} is not built ({path}); run once without --skip-build")
        log(f"building {what} -> {path}")
        return True

    def python(self, venv: str | None) -> Path:
        if venv is None:
            return Path(sys.executable)
        return self.venv(venv) / "bin" / "python"

    def venv(self, name: str) -> Path:
        """cache/venvs/NAME with PEERS[NAME] installed; a stamp file holds the pins it was made with."""
        d = self.cache / "venvs" / name
        stamp = d / "bench-pins.txt"
        pins = "\n".join(PEERS[name] + ([f"CMAKE_ARGS={llama_cmake_args()}"] if name == "llama" else []))
        if stamp.exists() and stamp.read_text() == pins:
            return d
        if self.skip:
            raise MissingBuild(f"--skip-build: the {name} venv is not built ({d})")
        sh([_base_python(), "-m", "venv", d])
        py = d / "bin" / "python"
        pins_list = list(PEERS[name])
        env = {}
        if name == "llama":  # no wheel: built from the sdist kept under cache/src (its convert script is needed too)
            src = self.llama_source()
            pins_list = [str(src) if p.startswith("llama-cpp-python") else p for p in pins_list]
            env = {"CMAKE_ARGS": llama_cmake_args(), "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
            if stamp.exists():  # built with other CMake flags: rebuild the extension, keep the rest of the venv
                sh([py, "-m", "pip", "uninstall", "-y", "llama-cpp-python"])
            pins_list = ["--no-cache-dir", *pins_list]
        sh([py, "-m", "pip", "install", *pins_list], env=env)
        if PEERS_REMOVE.get(name):
            sh([py, "-m", "pip", "uninstall", "-y", *PEERS_REMOVE[name]])
        stamp.write_text(pins)
        return d

    def llama_source(self) -> Path:
        src = self.cache / "src" / LLAMA_SDIST
        if not src.exists():
            (self.cache / "src").mkdir(parents=True, exist_ok=True)
            sh([_base_python(), "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d",
                self.cache / "src", "llama-cpp-python==0.3.36"])
            sh(["tar", "xzf", self.cache / "src" / f"{LLAMA_SDIST}.tar.gz", "-C", self.cache / "src"])
        return src

    def build(self, systems: list[System]) -> None:
        names = {s.name for s in systems}
        if names & {"ours-fp32", "ours-fp32-mlas", "ours-fp32-mapped", "ours-fp32-cached", "ortgenai-fp32",
                    "ortgenai-int4"}:
            self.ours("dense")
        if names & {"ours-int4", "ours-int4-mlas", "ours-int4-a8", "ours-int4-cached"}:
            self.ours("int4")
        if "ours-int4-b32" in names:
            self.ours("int4", "b32", ["--int4-block-size", "32"])
        for p in ("fp32", "int4"):
            if f"ortgenai-{p}" in names:
                self.ortgenai(p)
            if f"openvino-{p}" in names:
                self.openvino(p)
        if names & {"llamacpp-f32", "llamacpp-q4_0"}:
            self.llama("q4_0" in " ".join(names))

    def ours(self, weights: str, tag: str = "", extra: list | None = None) -> Path:
        """Our export_all of the checkpoint with `--weights weights` (+ `extra` flags) in ours-<weights>[-<tag>]."""
        out = self.dir / f"ours-{weights}" if not tag else self.dir / f"ours-{weights}-{tag}"
        stamp = out / "bench-export-code.txt"  # the export code it was made with: a change re-exports
        if out.exists() and (not stamp.exists() or stamp.read_text() != export_code_hash()):
            if self.skip:
                raise MissingBuild(f"--skip-build: {out} was exported by other export code; run without --skip-build")
            shutil.rmtree(out)
        if self.need(f"ours {weights}", out / "manifest.json"):
            sh([sys.executable, "-m", "qwen_vl_trt.export.export_all", self.ckpt, out, "--dtype", "fp32",
                "--no-engines", "--weights", weights, "--max-patches", "1024", "--max-batch", "1", "--max-seq",
                "512", "--max-cache-len", "512", *(extra or [])], cwd=ROOT)
            stamp.write_text(export_code_hash())
        return out

    def ortgenai(self, precision: str) -> Path:
        out = self.dir / f"ortgenai-{precision}"
        if self.need(f"onnxruntime-genai {precision}", out / "vision.onnx"):
            py = self.python("ortgenai")
            extra = "exclude_embeds=true prune_lm_head=true"
            sh([py, "-m", "onnxruntime_genai.models.builder", "-i", self.ckpt, "-o", out, "-p", precision, "-e",
                "cpu", "-c", self.dir / "ortgenai-hf-cache", "--extra_options", *extra.split()])
            grid = ["1", str(IMAGE_SIZE // 16), str(IMAGE_SIZE // 16)]
            sh([sys.executable, RUNNERS / "oga_graphs.py", self.ours("dense"), out, "--checkpoint", self.ckpt,
                "--grid", *grid, "--threads", str(self.threads)], cwd=ROOT)
        return out

    def openvino(self, precision: str) -> Path:
        out = self.dir / f"openvino-{precision}"
        if self.need(f"OpenVINO {precision}", out / "openvino_language_model.xml"):
            cli = self.venv("openvino") / "bin" / "optimum-cli"
            fmt = ["--weight-format", "fp32"] if precision == "fp32" else [
                "--weight-format", "int4", "--sym", "--group-size", "128", "--ratio", "1.0"]
            sh([cli, "export", "openvino", "--model", self.ckpt, "--task", "image-text-to-text", *fmt, out])
        return out

    def llama(self, quantized: bool) -> Path:
        out = self.dir / "llama"
        out.mkdir(exist_ok=True)
        py = self.python("llama")
        convert = self.llama_source() / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
        if self.need("llama.cpp f32 GGUF", out / "text-f32.gguf"):
            sh([py, convert, self.ckpt, "--outtype", "f32", "--outfile", out / "text-f32.gguf"])
        if self.need("llama.cpp mmproj GGUF", out / "mmproj-f32.gguf"):
            sh([py, convert, self.ckpt, "--outtype", "f32", "--mmproj", "--outfile", out / "mmproj-f32.gguf"])
        if quantized and self.need("llama.cpp Q4_0 GGUF", out / "text-q4_0.gguf"):
            code = ("import sys, llama_cpp as l; p = l.llama_model_quantize_default_params(); "
                    "p.ftype = l.LLAMA_FTYPE_MOSTLY_Q4_0; p.nthread = 2; "
                    "sys.exit(l.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")
            sh([py, "-c", code, out / "text-f32.gguf", out / "text-q4_0.gguf"])
        return out

    def hf_tokens(self, image: Path, tokens: int) -> list[int]:
        path = self.dir / f"hf-tokens-{tokens}.json"
        if self.need("HF reference tokens", path):
            sh([sys.executable, RUNNERS / "hf_reference.py", self.ckpt, "--image", image, "--prompt", PROMPT,
                "--tokens", str(tokens), "--out", path], cwd=ROOT)
        return json.loads(path.read_text())["tokens"]


def export_code_hash() -> str:
    """sha256 of the source files of export/ and model/ (what decides our artifacts)."""
    h = hashlib.sha256()
    for p in sorted([*ROOT.glob("export/*.py"), *ROOT.glob("model/*.py")]):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def _base_python() -> str:
    """The interpreter the project's venv was made from (peers' venvs are made from it, not layered on it)."""
    return getattr(sys, "_base_executable", None) or shutil.which("python3") or "python3"


def checkpoint_hash(ckpt: Path, memo: Path | None = None) -> str:
    """sha256 over the checkpoint's files (names and bytes), memoized in `memo` by their names, sizes and mtimes."""
    files = sorted(p for p in ckpt.iterdir() if p.is_file())
    sig = json.dumps([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    known = json.loads(memo.read_text()) if memo and memo.exists() else {}
    if known.get(str(ckpt.resolve()), {}).get("sig") == sig:
        return known[str(ckpt.resolve())]["sha256"]
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    if memo:
        known[str(ckpt.resolve())] = {"sig": sig, "sha256": h.hexdigest()}
        memo.write_text(json.dumps(known, indent=1))
    return h.hexdigest()


IMAGE_SIZE = 448


def bench_image(cache: Path) -> Path:
    """grace_hopper.jpg out of matplotlib's wheel (downloaded, not installed), centre crop 448x448 without
    resampling, saved as PNG (lossless)."""
    out = cache / f"grace_hopper_{IMAGE_SIZE}.png"
    if out.exists():
        return out
    wheels = cache / "src" / "matplotlib"
    if not list(wheels.glob("matplotlib-*.whl")):
        sh([_base_python(), "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", wheels,
            "matplotlib==3.10.8"])
    from io import BytesIO

    from PIL import Image

    with zipfile.ZipFile(next(wheels.glob("matplotlib-*.whl"))) as z:
        img = Image.open(BytesIO(z.read("matplotlib/mpl-data/sample_data/grace_hopper.jpg"))).convert("RGB")
    w, h = img.size
    left, top = (w - IMAGE_SIZE) // 2, (h - IMAGE_SIZE) // 2
    img.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE)).save(out)
    return out


# ----------------------------------------------------------------------------------------------- measure

def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over `seconds` (/proc/stat: everything but idle and iowait)."""
    def sample():
        vals = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(vals), vals[3] + vals[4]
    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def wait_quiet(limit_s: float, threshold: float = 0.10) -> float:
    """Wait until the CPUs are < threshold busy (up to limit_s); the last busy fraction seen."""
    end = time.time() + limit_s
    busy = cpu_busy()
    while busy >= threshold and time.time() < end:
        time.sleep(2)
        busy = cpu_busy()
    return busy


def bandwidth(threads: int) -> dict:
    """Read bandwidth of this machine in GB/s: the best of several streaming reads of a 3 GiB fp32 array in a
    fresh process (BLAS gemv, `threads` BLAS threads; and np.sum split over `threads` Python threads)."""
    code = f"""
import json, time, numpy as np
from concurrent.futures import ThreadPoolExecutor
a = np.full((24576, 32768), 1.0, np.float32)
x = np.ones(32768, np.float32)
gemv = sum_ = 0.0
for _ in range(5):
    t = time.perf_counter(); a @ x; gemv = max(gemv, a.nbytes / (time.perf_counter() - t) / 1e9)
with ThreadPoolExecutor({threads}) as ex:
    parts = np.array_split(a.reshape(-1), {threads})
    for _ in range(5):
        t = time.perf_counter(); list(ex.map(np.sum, parts)); sum_ = max(sum_, a.nbytes / (time.perf_counter() - t) / 1e9)
print(json.dumps({{"gemv": gemv, "sum": sum_}}))
"""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    res = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                                    env=env).stdout.strip().splitlines()[-1])
    res["best"] = max(res.values())
    return res


def step_bytes(system: System, art: Path) -> int:
    """Bytes of weights one decode step reads: every initializer of the decoder (lm_head included; the embedding
    table's one-row gather excluded where it is its own graph, and onnxruntime-genai's rotary cos/sin tables, of
    which a step gathers one row), from the model files of each system. OpenVINO: the language model's .bin;
    llama.cpp: the text GGUF (its tied token_embd is the lm_head)."""
    if system.runner == "run_ours.py":
        return _onnx_weight_bytes(art / "decoder.ort.onnx")
    if system.runner == "run_ortgenai.py":
        return _onnx_weight_bytes(art / "model.onnx")
    if system.runner == "run_openvino.py":
        return (art / "openvino_language_model.bin").stat().st_size
    # llama.cpp: the text GGUF is the decoder (tied token_embd is its lm_head, read every step)
    return art.stat().st_size


def _onnx_weight_bytes(path: Path) -> int:
    import numpy as np
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        if "cos_cache" in t.name or "sin_cache" in t.name:  # rotary tables: a step gathers its one row
            continue
        ext = {e.key: e.value for e in t.external_data}
        if "length" in ext:
            total += int(ext["length"])
        elif t.raw_data:
            total += len(t.raw_data)
        else:
            total += int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def run_once(b: Builder, s: System, image: Path, tokens: int, threads: int) -> dict:
    art = b.dir / s.artifact
    cmd = [str(b.python(s.venv)), str(RUNNERS / s.runner), str(art), "--image", str(image), "--prompt", PROMPT,
           "--tokens", str(tokens), "--threads", str(threads)]
    for k, v in s.options.items():
        cmd += ["--option", f"{k}={b.dir / v if k in ('mmproj', 'ort_cache') else v}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "PYTHONPATH": ""}
    if s.venv is not None:
        env.pop("VIRTUAL_ENV", None)
    with open(b.dir / "last-run.out", "w+") as fo, open(b.dir / "last-run.err", "w+") as fe:
        t_spawn = time.time()
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)  # its own rusage: ru_maxrss = the process's peak RSS (KiB)
        proc.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0), fe.seek(0)
        out, err = fo.read(), fe.read()
    line = next((x for x in out.splitlines() if x.startswith(MARK)), None)
    if proc.returncode != 0 or line is None:
        tail = (err or out).strip().splitlines()[-4:]
        return {"error": f"rc={proc.returncode}: " + " | ".join(tail)}
    res = json.loads(line[len(MARK):])
    res["startup_s"] = res.pop("ready_wall") - t_spawn
    res["peak_rss_gb"] = usage.ru_maxrss * 1024 / 1e9
    return res


# ----------------------------------------------------------------------------------------------- report

def summarize(values: list) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    med = statistics.median(vals)
    fmt = (lambda v: f"{v:.0f}") if med >= 100 else (lambda v: f"{v:.2f}")
    return f"{fmt(med)} ({fmt(min(vals))}-{fmt(max(vals))})" if len(vals) > 1 else fmt(med)


def equal_to(tokens: list, ref: list) -> str:
    if tokens == ref:
        return "yes"
    first = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), min(len(tokens), len(ref)))
    return f"no (from token {first})"


def table(systems: list[System], runs: dict, ref: list, bw: dict, nbytes: dict) -> str:
    rows = ["| system | decode tok/s | TTFT ms | start-up s | peak RSS GB | bytes/step GB | decode / roofline "
            "| tokens == HF |", "|---|---|---|---|---|---|---|---|"]
    for s in systems:
        ok = runs[s.name]
        good = [r for r in ok if "error" not in r]
        if not good:
            err = next((r["error"] for r in ok if "error" in r), "not run")
            rows.append(f"| {s.label} | failed: {err[:160]} | | | | | | |")
            continue
        tok_s = [r["decode_tok_s"] for r in good]
        frac = [nbytes[s.name] * t / (bw["best"] * 1e9) for t in tok_s if t]
        eq = sorted({equal_to(r["tokens"], ref) for r in good})
        eq = eq if s.exact else [f"{e} (quantized)" for e in eq]
        rows.append(f"| {s.label} | {summarize(tok_s)} | {summarize([r['ttft_ms'] for r in good])} | "
                    f"{summarize([r['startup_s'] for r in good])} | {summarize([r['peak_rss_gb'] for r in good])} | "
                    f"{nbytes[s.name] / 1e9:.2f} | {summarize(frac)} | {', '.join(eq)} |")
    return "\n".join(rows)


# Same-round ratios: a round runs every system once within a few minutes, so a ratio of two systems' figures in
# one round shares that phase of the machine, where the medians of the table above can come from different ones
# (this machine's figures move by tens of percent between phases). Higher is better for decode, lower for the rest.
METRICS = (("decode_tok_s", "decode", max), ("ttft_ms", "TTFT", min), ("startup_s", "start-up", min),
           ("peak_rss_gb", "peak RSS", min))


def round_ratios(ours: str, peers: list[str], runs: dict) -> dict:
    """{metric: [ours / best peer of the round]} over the rounds where `ours` and at least one peer ran; the best
    peer of a round is the fastest (decode) or the lowest (TTFT, start-up, peak RSS) of that round."""
    out = {key: [] for key, _, _ in METRICS}
    for i, mine in enumerate(runs[ours]):
        if "error" in mine:
            continue
        theirs = [runs[p][i] for p in peers if i < len(runs[p]) and "error" not in runs[p][i]]
        for key, _, best in METRICS:
            values = [r[key] for r in theirs if r.get(key)]
            if mine.get(key) and values:
                out[key].append(mine[key] / best(values))
    return out


def ratio_table(systems: list[System], runs: dict) -> str:
    """Each of ours against the best peer of its kind (exact: the fp32 peers; quantized: the quantized ones), as
    the median (min-max) of the same-round ratios and the rounds that meet the target (decode >= 1, others <= 1)."""
    peers = {kind: [s.name for s in systems if not s.name.startswith("ours") and s.exact == kind]
             for kind in (True, False)}
    rows = ["| system | vs peers | " + " | ".join(f"{label} (rounds met)" for _, label, _ in METRICS) + " |",
            "|---|---|" + "---|" * len(METRICS)]
    for s in systems:
        if not s.name.startswith("ours") or not peers[s.exact]:
            continue
        ratios = round_ratios(s.name, peers[s.exact], runs)
        cells = []
        for key, _, best in METRICS:
            r = ratios[key]
            met = sum((x >= 1) if best is max else (x <= 1) for x in r)
            cells.append(f"{summarize(r)} ({met}/{len(r)})" if r else "-")
        rows.append(f"| {s.label} | {', '.join(peers[s.exact])} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--systems", default=",".join(s.name for s in SYSTEMS if "cached" not in s.name),
                    help="comma-separated (default: all but the *-cached ones, whose --ort-cache is a full copy of "
                         "the weights on disk), from: " + ", ".join(s.name for s in SYSTEMS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="rounds run first and not counted")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-build", action="store_true", help="fail instead of building a missing venv / export")
    ap.add_argument("--build-only", action="store_true", help="build everything the systems need, then stop")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("QWEN_VL_BENCH_CACHE",
                                                                      Path.home() / ".cache" / "qwen-vl-trt-bench")))
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="default: CACHE/ckpt-2b-8l, made by make_random_checkpoint.py 2B --text-layers 8 "
                         "--vision-depth 8")
    ap.add_argument("--quiet-wait", type=float, default=120.0, help="seconds to wait for a quiet machine per round")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    ap.add_argument("--ratios-of", type=Path, default=None, metavar="RUNS_JSON",
                    help="print only the same-round ratio table of a saved run (CACHE/artifacts/<key>/last-runs.json, "
                         "rewritten by every run: copy it to keep one), then stop")
    args = ap.parse_args(argv)
    if args.ratios_of is not None:
        saved = json.loads(args.ratios_of.read_text())["runs"]
        print(ratio_table([s for s in SYSTEMS if s.name in saved], saved))
        return 0
    by_name = {s.name: s for s in SYSTEMS}
    unknown = [n for n in args.systems.split(",") if n not in by_name]
    if unknown:
        ap.error(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(by_name)}")
    systems = [by_name[n] for n in args.systems.split(",")]
    args.cache.mkdir(parents=True, exist_ok=True)
    ckpt = args.checkpoint or args.cache / "ckpt-2b-8l"
    if not (ckpt / "config.json").exists():
        if args.checkpoint is not None or args.skip_build:
            print(f"error: no checkpoint at {ckpt}", file=sys.stderr)
            return 2
        sh([sys.executable, HERE / "make_random_checkpoint.py", "2B", ckpt, "--text-layers", "8",
            "--vision-depth", "8"], cwd=ROOT)
    try:
        image = bench_image(args.cache)
        b = Builder(args.cache, ckpt, args.skip_build, args.threads)
        for s in systems:
            if s.venv:
                b.venv(s.venv)
        b.build(systems)
        ref = b.hf_tokens(image, args.tokens)
    except MissingBuild as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.build_only:
        log(f"built: {b.dir}")
        return 0
    nbytes = {s.name: step_bytes(s, b.dir / s.artifact) for s in systems}

    log("bandwidth roofline")
    busy_bw = wait_quiet(args.quiet_wait)
    bw = bandwidth(args.threads)
    runs: dict = {s.name: [] for s in systems}
    rounds = []
    for r in range(args.warmup + args.rounds):
        busy = wait_quiet(args.quiet_wait)
        rounds.append(busy)
        order = systems[r % len(systems):] + systems[:r % len(systems)]
        for s in order:
            log(f"round {r + 1}/{args.warmup + args.rounds} ({'warm-up' if r < args.warmup else 'timed'}, "
                f"CPU busy {busy:.0%} before it): {s.name}")
            res = run_once(b, s, image, args.tokens, args.threads)
            if "error" in res:
                log(f"  {s.name} failed: {res['error']}")
            else:
                log(f"  {res['decode_tok_s']:.2f} tok/s, TTFT {res['ttft_ms']:.0f} ms, start-up "
                    f"{res['startup_s']:.2f} s, RSS {res['peak_rss_gb']:.2f} GB, {equal_to(res['tokens'], ref)}")
            if r >= args.warmup:
                runs[s.name].append(res)
    timed = rounds[args.warmup:]
    report = "\n".join([
        f"# CPU peers: same checkpoint, same request, interleaved -- {utc_now()}",
        f"machine: {machine()}; {args.threads} threads everywhere",
        f"command: python bench/bench_cpu_peers.py {' '.join(argv if argv is not None else sys.argv[1:])}",
        f"checkpoint: {ckpt} (sha256 {b.key[:16]}); image {image.name}; \"{PROMPT}\"; {args.tokens} greedy tokens, "
        "EOS ignored",
        f"rounds: {args.warmup} warm-up + {args.rounds} timed, order rotated per round; CPU busy before each timed "
        f"round: {', '.join(f'{x:.0%}' for x in timed)}"
        + (" (**busy: > 10 %**)" if any(x >= 0.10 for x in timed) else " (quiet: < 10 %)"),
        f"bandwidth roofline: {bw['best']:.1f} GB/s (gemv {bw['gemv']:.1f}, sum {bw['sum']:.1f}; CPU busy "
        f"{busy_bw:.0%} before it)",
        "cells: median (min-max) over the timed rounds", "",
        table(systems, runs, ref, bw, nbytes), "",
        "Same-round ratios, ours / the best peer of that round and kind (decode: higher is better; TTFT, start-up, "
        "peak RSS: lower): median (min-max) over the rounds, and the rounds that meet the target", "",
        ratio_table(systems, runs), ""])
    print(report)
    if args.out:
        args.out.write_text(report)
    (b.dir / "last-runs.json").write_text(json.dumps({"runs": runs, "bandwidth": bw, "ref": ref}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
