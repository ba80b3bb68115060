"""Shared fixtures: tiny offline models and data, built once per test session in a temp dir."""

import os
import sys
from pathlib import Path

# Nothing may be fetched from the Hub: every test loads what it built itself.
for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[var] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# One thread per test process, and per process a test launches (they inherit it; a value you set is kept). The
# tiny models gain nothing from a second thread, and where the cores are busy with anything else, OpenMP
# threads that spin waiting for each other slow every step down many times over: building the session's
# assets took 8 s in one thread and 129 s in two beside one other busy process, on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

import train_latent_comm as tlc  # noqa: E402

SCRIPT = str(REPO_ROOT / "train_latent_comm.py")


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """Paths of a tiny teacher (hidden 64), student (hidden 48), 12 conversations and their data latents."""
    return tlc.build_demo_assets(tmp_path_factory.mktemp("assets"), n_records=12)


@pytest.fixture(scope="session")
def tokenizer(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets["teacher"])


@pytest.fixture()
def tiny_model(assets):
    """A fresh LatentCommModel (float32, dropout off) over the tiny teacher and student, K=5."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_pretrained(assets["teacher"], dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(assets["student"], dtype=torch.float32)
    vocab = teacher.config.vocab_size
    settings = tlc.LatentSettings(K=5, bop_id=vocab - 2, eop_id=vocab - 1, kl_window=16)
    return tlc.LatentCommModel(teacher, student, settings, head_num_heads=4, head_dropout=0.0)
