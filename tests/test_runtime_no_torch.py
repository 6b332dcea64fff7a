"""The runtime never imports torch: every module of qwen_vl_trt.runtime (its subpackages too) and of
qwen_vl_trt.model (which the runtime shares with export) imports, and a whole
generation (image + prompt -> tokens) runs, in a process where any import of torch or transformers is
recorded and refused by a meta-path finder (so a `try: import torch` fallback would be caught too)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from qwen_vl_trt.export.export_all import export_all
from qwen_vl_trt.model.contracts import Limits

BLOCKER = r'''
import importlib.abc, json, pkgutil, sys
attempts = []
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "torchvision"):
            attempts.append(name)
            raise ImportError(f"blocked: {name}")
        return None
sys.meta_path.insert(0, Block())
import qwen_vl_trt.model as md
import qwen_vl_trt.runtime as rt
modules = sorted(m.name for pkg in (rt, md) for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."))
for m in modules:
    __import__(m)
from qwen_vl_trt.runtime.serve.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "modules": modules, "attempts": attempts}), file=sys.stderr)
'''


def test_runtime_imports_and_generates_without_torch(qwen3_vl_ckpt, tmp_path):
    export_all(qwen3_vl_ckpt, tmp_path / "art", "fp32", Limits(max_seq=512, max_cache_len=1024))
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    r = subprocess.run([sys.executable, "-c", BLOCKER, "--model-dir", str(tmp_path / "art"), "--image",
                        str(tmp_path / "a.png"), "--json", "--temperature", "0", "--ignore-eos", "--max-new-tokens", "4"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stderr.strip().splitlines()[-1])
    assert report["rc"] == 0 and report["attempts"] == []
    assert {f"qwen_vl_trt.runtime.{m}" for m in ("serve.cli", "serve.server", "request", "generate", "backends.ort", "backends.kv_cache", "sampling",
                                                 "pipeline", "preprocess")} <= set(report["modules"])
    assert {"qwen_vl_trt.model.manifest", "qwen_vl_trt.model.spec"} <= set(report["modules"])
    assert len(json.loads(r.stdout)["token_ids"]) == 4
