"""Shared test helpers: seeded fresh random inputs, error metrics, device parametrisation."""
from __future__ import annotations

import os

import torch  # does not import triton

# Triton decides at decoration time whether a kernel is interpreted, so the switch must be set
# before any test module (or pluglm_kernels) imports a Triton kernel: with no GPU, every Triton
# kernel runs under the interpreter on CPU tensors; with a GPU, Triton compiles for it and the
# CPU-interpreter tests skip.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

# Relative-error tolerances against a float64 reference (STYLE.md §6).
RTOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-12}

# float16/bfloat16 results are judged against the error the pure-PyTorch reference itself
# makes in that precision (float32 accumulation, values stored in the input dtype): draws whose
# gradient sums cancel (attentive pooling: sum_t ds_t = 0) lift both errors together, from
# 5e-3 to 0.5 in bfloat16, so no fixed tolerance is both safe and tight. The kernels' error is
# a steady multiple of the reference's (median 1.0-1.2x C++, 1.3-2.9x Triton, whose u/du
# roundings the reference does not make); over 200 seeds per bf16 case of the encode_knowledge
# tests the largest error / tolerance was 0.27 (C++) and 0.62 (Triton) with this factor and
# the tests' floors (docs/design.md, "Test tolerances").
LOWP_FACTOR = 8.0


def triton_device() -> str:
    """Where this session's Triton kernels run: "cpu" under TRITON_INTERPRET=1 (no GPU),
    else "cuda"; skips the calling test module when neither works (triton missing, or
    imported before the interpreter switch was set)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    if HAS_CUDA:
        return "cuda"
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1 (triton imported before it was set)",
                allow_module_level=True)


def wordpiece_tokenizer(tokens, *, mask_token: bool = True):
    """A BERT-style fast tokenizer built in code (no files, no network): WordPiece over
    ``tokens`` after the specials [PAD] [UNK] [CLS] [SEP] (and [MASK] unless
    ``mask_token=False``), in that order, so ids are stable across tests."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + (["[MASK]"] if mask_token else [])
    vocab = {w: i for i, w in enumerate(specials + list(tokens))}
    tk = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tk.decoder = decoders.WordPiece()
    extra = {"mask_token": "[MASK]"} if mask_token else {}
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", **extra)


def run_child_until_killed(argv: list[str], env: dict, signal_file=None, stage: str = "", *,
                           while_paused=None, timeout: float = 120.0) -> None:
    """Run a child process that must die by SIGKILL mid-save. With ``signal_file``, wait
    until the child creates it (it paused at ``stage``), run ``while_paused()`` (e.g. read
    the files a concurrent reader would see), then SIGKILL it; without, the child kills
    itself. Fails if the child exits on its own first, never reaches the stage, or ends by
    anything but SIGKILL; never leaves it running."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = b""
    try:
        if signal_file is not None:
            deadline = time.monotonic() + timeout
            while not signal_file.exists():
                if proc.poll() is not None:
                    _, err = proc.communicate()
                    raise AssertionError(f"child exited before {stage}: {err.decode()[-2000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"child never reached {stage}")
                time.sleep(0.02)
            if while_paused is not None:
                while_paused()
            os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]


def cpu_has(flag: str) -> bool:
    """Whether /proc/cpuinfo lists ``flag`` (e.g. "avx2", "avx512bw"); False where unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            return flag in f.read().split()
    except OSError:
        return False


SMALL_WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "north", "paper",
               "light", "green", "table", "sound", "glass", "metal", "bird", "ocean", "plant",
               "storm", "salt"]


def random_sentences(n: int, seed: int = 0, max_words: int = 12):
    """n sentences of 2..max_words SMALL_WORDS and a final "." (a generator: callers that
    must not need a list get none)."""
    import random

    rng = random.Random(seed)
    for _ in range(n):
        yield " ".join(rng.choice(SMALL_WORDS) for _ in range(rng.randint(2, max_words))) + "."


class MeanPoolEncoder(torch.nn.Module):
    """A tiny deterministic knowledge encoder for memory tests: mean-pooled embeddings
    projected to (key, value). Weights come from a fixed seed so two instances agree."""

    def __init__(self, vocab, key_dim=8, d=12):
        super().__init__()
        torch.manual_seed(3)
        self.emb = torch.nn.Embedding(vocab, d)
        self.k = torch.nn.Linear(d, key_dim)
        self.v = torch.nn.Linear(d, d)

    def encode_memory(self, ids, mask):
        h = (self.emb(ids) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.k(h), self.v(h)


def tiny_memory_model(vocab: int, **overrides):
    """A 2-layer float64 PlugLMModel (top block a memory layer, reference kernels, no dropout)
    with weights pushed away from init, for memory tests that compare two read paths."""
    from pluglm import PlugLMConfig, PlugLMModel

    cfg = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=48, max_position_embeddings=40, type_vocab_size=2,
               num_memory_layers=1, memory_k=3, key_dim=16, doc_max_length=16,
               memory_ffn_dim=24, kernel_backend="reference", hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0, memory_attention_dropout=0.0)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = PlugLMModel(PlugLMConfig(**cfg)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    denom = ref64.norm().item()
    return (out64 - ref64).norm().item() / (denom if denom > 0 else 1.0)


def lowp_tol(floor: float, lowp: torch.Tensor | None, ref: torch.Tensor) -> float:
    """Tolerance for a low-precision result's rel_err against the float64 ``ref``: ``floor``,
    or LOWP_FACTOR times the error of ``lowp`` (the reference computed in the low precision)
    where that is larger."""
    return floor if lowp is None else max(floor, LOWP_FACTOR * rel_err(lowp.cpu(), ref.cpu()))


def pytest_collection_modifyitems(config, items):
    # GPU-marked tests skip cleanly where no GPU exists.
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def draw_seed() -> int:
    """A fresh 32-bit seed, or the one in PLUGLM_TEST_SEED (to replay a failure)."""
    pinned = os.environ.get("PLUGLM_TEST_SEED")
    if pinned:
        return int(pinned)
    return int.from_bytes(os.urandom(4), "little")


@pytest.fixture
def fresh_seed(request):
    """A different seed each test run so inputs are fresh, yet replayable: a failing test's
    report names it, and PLUGLM_TEST_SEED=<seed> makes every test draw that seed."""
    seed = draw_seed()
    request.node._pluglm_seed = seed
    torch.manual_seed(seed)
    return seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "_pluglm_seed", None)
    if seed is not None and report.failed:
        report.sections.append(("fresh seed", f"replay with PLUGLM_TEST_SEED={seed}"))


class RssMeter:
    """Reads this process's resident set size (MB) with glibc's malloc made predictable.

    glibc raises its mmap threshold dynamically after large frees, after which buffers of a
    few MB come from the heap and its free space is handed back only when the top is free:
    the RSS then swings by tens of MB from one reading to the next with nothing leaked
    (observed: +-40 MB around 1 GB in CI). Fixing the mmap threshold at 1 MB sends every
    large buffer through mmap/munmap, so freed memory leaves the RSS at once and readings
    agree to ~1 MB; a leak of a table per refresh then stands out. `restore()` puts the
    thresholds at glibc's dynamic ceiling (32 MB mmap, 64 MB trim) for the tests after.
    """

    def __init__(self) -> None:
        import ctypes
        import ctypes.util

        try:
            self._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
            self._libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
            self._libc.mallopt(M_TRIM_THRESHOLD, 1 << 20)
        except (OSError, AttributeError):  # not glibc: readings are noisier, still valid
            self._libc = None

    def restore(self) -> None:
        if self._libc is not None:
            self._libc.mallopt(-3, 32 << 20)
            self._libc.mallopt(-1, 64 << 20)

    def __call__(self) -> float:
        if self._libc is not None:
            try:
                self._libc.malloc_trim(0)
            except AttributeError:
                pass
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture
def rss_mb():
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("RSS is read from /proc (Linux)")
    meter = RssMeter()
    yield meter
    meter.restore()
