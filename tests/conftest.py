"""Session-scoped tiny checkpoints of the real architectures (made with HF transformers) and their exports.

Every fixture is seeded; every checkpoint is written as a user would have it (config.json, safetensors,
tokenizer, processor configs) by `qwen_vl_trt.export.demo_checkpoint.make_checkpoint`.
"""
from __future__ import annotations

import numpy as np
import pytest

from hf_reference import fp32_graphs, hf_model
from qwen_vl_trt.export.demo_checkpoint import make_checkpoint


@pytest.fixture(scope="session")
def qwen3_vl_ckpt(tmp_path_factory):
    """Untied Qwen3-VL: 4 text layers (GQA 4/2, head_dim 32 != 64/4), 4 vision blocks, 3 DeepStack levels."""
    return make_checkpoint(tmp_path_factory.mktemp("qwen3_vl"), "qwen3_vl", seed=0)


@pytest.fixture(scope="session")
def qwen3_vl_tied_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen3_vl_tied"), "qwen3_vl", tie_word_embeddings=True, seed=1)


@pytest.fixture(scope="session")
def qwen3_vl_fp32_graphs(qwen3_vl_ckpt, tmp_path_factory):
    return fp32_graphs(qwen3_vl_ckpt, tmp_path_factory.mktemp("qwen3_vl_fp32_graphs"))


@pytest.fixture(scope="session")
def hf_qwen3_vl(qwen3_vl_ckpt):
    return hf_model(qwen3_vl_ckpt)


@pytest.fixture(scope="session")
def qwen2_5_vl_ckpt(tmp_path_factory):
    """Untied Qwen2.5-VL: 4 text layers (GQA 4/2, q/k/v bias, chunked MRoPE [2,3,3]), 4 vision blocks with
    112-px windows and full attention in blocks 1 and 3; released (4.x) key layout as 5.x save_pretrained writes."""
    return make_checkpoint(tmp_path_factory.mktemp("qwen2_5_vl"), "qwen2_5_vl", seed=0)


@pytest.fixture(scope="session")
def qwen2_5_vl_tied_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen2_5_vl_tied"), "qwen2_5_vl", tie_word_embeddings=True, seed=1)


@pytest.fixture(scope="session")
def qwen2_5_vl_fp32_graphs(qwen2_5_vl_ckpt, tmp_path_factory):
    return fp32_graphs(qwen2_5_vl_ckpt, tmp_path_factory.mktemp("qwen2_5_vl_fp32_graphs"))


@pytest.fixture(scope="session")
def hf_qwen2_5_vl(qwen2_5_vl_ckpt):
    return hf_model(qwen2_5_vl_ckpt)


@pytest.fixture(scope="session")
def qwen3_vl_moe_ckpt(tmp_path_factory):
    """Untied Qwen3-VL-MoE: the tiny Qwen3-VL with 8 experts, top-2, moe_intermediate_size 24 (2I != C, I != C),
    layer 1 a dense mlp_only layer; experts stored in the release layout, round trip checked when written."""
    return make_checkpoint(tmp_path_factory.mktemp("qwen3_vl_moe"), "qwen3_vl_moe", seed=2)


@pytest.fixture(scope="session")
def qwen3_vl_moe_tied_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen3_vl_moe_tied"), "qwen3_vl_moe", tie_word_embeddings=True,
                           seed=3)


@pytest.fixture(scope="session")
def qwen3_vl_moe_fp32_graphs(qwen3_vl_moe_ckpt, tmp_path_factory):
    return fp32_graphs(qwen3_vl_moe_ckpt, tmp_path_factory.mktemp("qwen3_vl_moe_fp32_graphs"))


@pytest.fixture(scope="session")
def hf_qwen3_vl_moe(qwen3_vl_moe_ckpt):
    return hf_model(qwen3_vl_moe_ckpt)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
