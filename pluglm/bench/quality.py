"""``pluglm bench --quality``: does a PlugLM trained with this package read its memory?

A small ``PlugLMForMaskedLM`` is trained from scratch on masked-attribute queries about
invented entities (``pluglm.bench.knowledge_base``) with the whole training stack: memory
layer, stale-key search + fresh re-encode of the retrieved entries, keys refreshed by
``AsyncKeyRefresher``, kernels on ``backend="auto"``, the cold-start fix
``PlugLMConfig.retrieval_init="aligned"`` (docs/design.md §1). It is then measured on
held-out entities (facts in the memory, never in a training query):

* accuracy with the right memory / with a memory of unrelated entries / gold entry in top-N;
* knowledge update: 500 entities' attribute changed in the memory, only those entries
  re-encoded, no training; every parameter and buffer hashed before and after;
* domain adaptation, no training on B: domain-B queries (another entity type with other
  attributes, in entry and query wordings no training text has; answers from the same
  typed value pools) with B's memory plugged in vs with A's, and with B's entries in a
  second B wording;
* removal of 500 entries;
* a refresh-interval ablation (1, 20, 200 steps, never) and the same run with
  ``kernel_backend="reference"``.

Training recipe (what made it reliable: benchmarks/NOTES.md, "Quality"): the model's
default ``retrieval_init="aligned"``, ``model.align_retrieval(memory)`` once the memory is
built (centred keys and values), ``pluglm.training.RetrievalAlignment`` added to the loss,
and batches that mix queries with masked memory entries of the *training* entities (the
paper's corpus MLM; held-out entries never appear in a batch). Each key refresh is waited for
(``sync_refresh``) so that a run depends only on its seed. Reading the memory is learnt
after retrieval locks in (~step 300) and takes ~800 more steps: 1,600 steps in the full run,
one seed of it in ``--quick``.

``run_quality(QualityConfig.make(quick, seed), jobs=N)`` returns the result dict; ``write_all``
writes quality.json, quality.md and the plots. Fractions are in [0, 1]. With ``jobs`` > 1 the
seeds, ablation runs and backend check run side by side in spawn worker processes, one torch
thread each (``pluglm bench --quality --jobs N``; default one per core): two threads barely
speed up one run of this small model and stall under contention (benchmarks/NOTES.md,
"Quality"); the numbers are those of ``jobs=1`` at 1 thread.
"""
from __future__ import annotations

import copy
import hashlib
import math
import platform
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .knowledge_base import OTHER_PHRASING, RELATIONS, build_tokenizer, make_knowledge_base


@dataclass
class QualityConfig:
    seed: int = 0
    seeds: int = 3                     # training seeds seed, seed+1, ... (same knowledge base)
    n_a: int = 3000                    # domain-A entities (= memory entries)
    n_b: int = 1000                    # domain-B entities
    heldout: int = 1000                # domain-A entities never in a training query
    name_pool: int = 90                # first and last names: 8,100 distinct names
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    key_dim: int = 64
    memory_k: int = 4
    knowledge_attention: str = "multi_head"
    steps: int = 1600
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 50
    refresh_interval: int = 20
    retrieval_init: str = "aligned"
    # Entries pooled without positions (PlugLMConfig.doc_position_embeddings=False): with
    # positions, reading learnt 2x slower and was tied to one entry layout
    # (benchmarks/NOTES.md, "Quality").
    doc_positions: bool = False
    align_weight: float = 1.0          # RetrievalAlignment weight (0 = off)
    align_steps: int = 0               # 0 = the whole run
    entry_mix: float = 0.5             # fraction of each batch: masked entries of training entities
    center: int = 1                    # align_retrieval(memory): centred keys and values
    backend: str = "auto"
    eval_every: int = 100
    curve_queries: int = 400           # held-out queries per point of the training curves
    n_edit: int = 500
    n_remove: int = 500
    # domain B (docs: module docstring): the task is learnt on n_b_train ships' queries for
    # b_steps steps with B's memory plugged in; evaluation uses the other ships, whose facts
    # are only in B's memory
    n_b_train: int = 100
    b_steps: int = 100
    b_lr: float = 5e-4
    ablation: tuple = (1, 20, 200, 0)  # refresh intervals (0 = never) run with seed
    ablation_steps: int = 800          # steps of the ablation and backend-check runs
    backend_check: bool = True
    threads: int | None = None         # torch threads (None = leave as is)
    # Wait for each key refresh right after it starts: the run then depends only on the seed
    # (an asynchronous refresh swaps its keys in at whichever step its thread finishes; on a
    # loaded CPU the refresh thread starves, keys stay stale for hundreds of steps and
    # retrieval does not learn: benchmarks/NOTES.md, "Quality").
    sync_refresh: bool = True
    quick: bool = False

    @classmethod
    def make(cls, quick: bool = False, seed: int = 0, **kw) -> "QualityConfig":
        if quick:  # one seed of the full configuration, no ablation or backend check
            base = cls(seed=seed, seeds=1, eval_every=200, ablation=(), backend_check=False,
                       quick=True)
        else:
            base = cls(seed=seed, eval_every=200)
        return replace(base, **kw)


# ----------------------------------------------------------------------------- helpers


def _encode_queries(tok, queries):
    enc = tok([q.text for q in queries], padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pos = (ids == tok.mask_token_id).float().argmax(1)  # [Q] the [MASK] position
    answers = torch.tensor(tok.convert_tokens_to_ids([q.answer for q in queries]))
    return ids, mask, pos, answers


def state_hash(model) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(list(model.state_dict().items())):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@torch.no_grad()
def predict(model, memory, tok, queries, batch_size: int = 512):
    """-> (predicted token ids [Q], retrieved entry ids [Q, N]) in eval mode with ``memory``."""
    ids, mask, pos, _ = _encode_queries(tok, queries)
    was = model.training
    model.eval()
    preds, retrieved = [], []
    try:
        for s in range(0, ids.shape[0], batch_size):
            out = model(input_ids=ids[s:s + batch_size], attention_mask=mask[s:s + batch_size],
                        memory=memory, output_retrieval=True)
            p = pos[s:s + batch_size]
            logits = out.logits[torch.arange(p.shape[0]), p]  # [b, V]
            preds.append(logits.argmax(-1))
            retrieved.append(out.retrieval[-1].indices.cpu())
    finally:
        model.train(was)
    return torch.cat(preds), torch.cat(retrieved)


def accuracy(model, memory, tok, queries, *, targets=None, gold=None):
    """Fraction of queries answered with their answer (or ``targets``); with ``gold`` (entry id
    per query), also the fraction whose gold entry is in the top-N of the last memory layer."""
    if not queries:
        return float("nan"), float("nan")
    preds, retrieved = predict(model, memory, tok, queries)
    want = torch.tensor(tok.convert_tokens_to_ids(
        [q.answer for q in queries] if targets is None else targets))
    acc = float((preds == want).float().mean())
    rec = float("nan")
    if gold is not None:
        rec = float((retrieved == torch.as_tensor(gold)[:, None]).any(1).float().mean())
    return acc, rec


def build_memory(texts, tok, model, source="kb"):
    from ..memory import KnowledgeMemory

    mem = KnowledgeMemory.from_texts(texts, tok, source=source, max_length=model.config.doc_max_length)
    mem.encode(model, batch_size=1024, progress=False)
    return mem


def make_model(cfg: QualityConfig, tok, *, backend=None, retrieval_init=None):
    from ..configuration_pluglm import PlugLMConfig
    from ..modeling_pluglm import PlugLMForMaskedLM

    conf = PlugLMConfig(
        vocab_size=len(tok), hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, intermediate_size=2 * cfg.hidden,
        max_position_embeddings=32, pad_token_id=tok.pad_token_id, num_memory_layers=1,
        memory_k=cfg.memory_k, key_dim=cfg.key_dim, doc_max_length=32,
        memory_ffn_dim=cfg.hidden, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        memory_attention_dropout=0.0, knowledge_attention=cfg.knowledge_attention, kernel_backend=backend or cfg.backend,
        retrieval_init=retrieval_init or cfg.retrieval_init,
        doc_position_embeddings=cfg.doc_positions)
    return PlugLMForMaskedLM(conf)


# ---------------------------------------------------------------------------- training


class _Data:
    """The knowledge base, tokenizer and the fixed query sets of one experiment."""

    def __init__(self, cfg: QualityConfig):
        self.kb = kb = make_knowledge_base(cfg.seed, n_a=cfg.n_a, n_b=cfg.n_b, n_unrelated=cfg.n_a,
                                           heldout=cfg.heldout, name_pool=cfg.name_pool)
        self.tok = build_tokenizer(kb)
        rng = random.Random(cfg.seed + 7919)
        self.train_q = kb.queries("A", kb.train_entities, rng, per_relation=3)
        self.eval_q = kb.queries("A", kb.heldout_entities, rng, per_relation=1)
        self.cfg = cfg
        if not 0 < cfg.n_b_train < cfg.n_b:
            raise ValueError(f"n_b_train ({cfg.n_b_train}) must be in [1, n_b = {cfg.n_b})")
        b_order = list(range(len(kb.entities["B"])))
        random.Random(cfg.seed + 15485863).shuffle(b_order)
        self.b_train_entities = sorted(b_order[:cfg.n_b_train])
        self.b_eval_entities = sorted(b_order[cfg.n_b_train:])
        self.b_q = kb.queries("B", self.b_eval_entities, rng, per_relation=1)
        self.b_train_q = kb.queries("B", self.b_train_entities, rng, per_relation=99)
        self.texts = {d: kb.entries(d) for d in ("A", "B", "unrelated")}
        self.texts["B_other_phrasing"] = kb.entries("B", template=OTHER_PHRASING)
        self.train_tensors = _encode_queries(self.tok, self.train_q)
        self.train_gold = torch.tensor([q.entity for q in self.train_q])
        # masked memory entries of the TRAINING entities (never held-out ones): the corpus
        # MLM of the paper's pretraining, where each masked sentence can read its own entry
        tr = list(kb.train_entities)
        enc = self.tok([self.texts["A"][i] for i in tr], padding=True, return_tensors="pt")
        self.entry_ids, self.entry_mask = enc["input_ids"], enc["attention_mask"]
        vals = torch.tensor([[self.tok.convert_tokens_to_ids(kb.entities["A"][i].attrs[r[0]])
                              for r in RELATIONS] for i in tr])  # [E, R]
        self.entry_vals = vals
        self.entry_pos = (self.entry_ids[:, None, :] == vals[:, :, None]).float().argmax(-1)  # [E, R]
        self.entry_gold = torch.tensor(tr)
        # edits: n_edit held-out entities, one relation each, a new value
        held = list(kb.heldout_entities)
        rng.shuffle(held)
        self.edit_ids = sorted(held[:cfg.n_edit])
        self.edit_attrs = {}
        for i in self.edit_ids:
            e = kb.entities["A"][i]
            rel = rng.choice([r[0] for r in RELATIONS])
            new = dict(e.attrs)
            new[rel] = kb.other_value("A", rel, e.attrs[rel], rng)
            self.edit_attrs[i] = (rel, new)
        self.edit_texts = [kb.entities["A"][i].entry(self.edit_attrs[i][1]) for i in self.edit_ids]
        q_edit = []
        for i in self.edit_ids:
            rel, new = self.edit_attrs[i]
            q = kb.queries("A", [i], rng, per_relation=1, relations=[rel])[0]
            q.answer = new[rel]
            q_edit.append(q)
        self.edit_q = q_edit
        edited = set(self.edit_ids)
        self.unedited_q = [q for q in self.eval_q if q.entity not in edited]
        rng2 = random.Random(cfg.seed + 104729)
        self.remove_ids = sorted(rng2.sample(list(kb.heldout_entities), cfg.n_remove))
        removed = set(self.remove_ids)
        self.removed_q = [q for q in self.eval_q if q.entity in removed]
        self.kept_q = [q for q in self.eval_q if q.entity not in removed]
        self.curve_q = rng2.sample(self.eval_q, min(cfg.curve_queries, len(self.eval_q)))
        self.curve_edit_q = self.edit_q[:cfg.curve_queries]
        self.edited_texts_all = list(self.texts["A"])
        for i, t in zip(self.edit_ids, self.edit_texts):
            self.edited_texts_all[i] = t


def _step(model, loss, opt, refresher, sync: bool, sched=None) -> None:
    """One optimizer step (gradients clipped to norm 1), then the key refresher's step,
    waited for when ``sync`` (``QualityConfig.sync_refresh``)."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if sched is not None:
        sched.step()
    opt.zero_grad(set_to_none=True)
    refresher.step()
    if sync:
        refresher.wait()


def train(cfg: QualityConfig, data: _Data, seed: int, *, refresh_interval: int | None = None,
          backend: str | None = None, curves: bool = False, log=None):
    """Train one model. Returns (model, info) with info = wall time, refreshes, curves."""
    from ..refresh import AsyncKeyRefresher
    from ..training import RetrievalAlignment

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    interval = cfg.refresh_interval if refresh_interval is None else refresh_interval
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tok = data.tok
    model = make_model(cfg, tok, backend=backend)
    t0 = time.perf_counter()
    memory = build_memory(data.texts["A"], tok, model, source="A")
    if cfg.center:
        model.align_retrieval(memory)
        memory.encode(model, batch_size=1024, progress=False)
    model.set_memory(memory)
    # A refresh that training waits for runs at normal priority: "low" (nice +10) only helps
    # when training goes on beside it; waited for on a loaded CPU, the niced thread starves
    # (measured: 0.73-1.0 s per waited refresh beside two busy processes, 0.15-0.35 s at
    # "normal", 0.05 s idle; benchmarks/NOTES.md, "Quality"). Priority never changes a number.
    refresher = AsyncKeyRefresher(model, memory, interval=interval,
                                  priority="normal" if cfg.sync_refresh else "low")
    align = RetrievalAlignment(model, weight=cfg.align_weight, steps=cfg.align_steps or None)
    ids, mask, pos, answers = data.train_tensors
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    curve = {"step": [], "right": [], "wrong": [], "edited": [], "recall": [], "loss": []}
    eval_s = 0.0
    losses, hits = [], []

    def point(step):
        te = time.perf_counter()
        right = build_memory(data.texts["A"], tok, model)
        a, r = accuracy(model, right, tok, data.curve_q, gold=[q.entity for q in data.curve_q])
        wrong = build_memory(data.texts["unrelated"], tok, model)
        w, _ = accuracy(model, wrong, tok, data.curve_q)
        edited = build_memory(data.edited_texts_all, tok, model)
        e, _ = accuracy(model, edited, tok, data.curve_edit_q)
        curve["step"].append(step)
        curve["right"].append(a)
        curve["wrong"].append(w)
        curve["edited"].append(e)
        curve["recall"].append(r)
        curve["loss"].append(sum(losses[-20:]) / max(1, len(losses[-20:])))
        curve.setdefault("train_recall", []).append(sum(hits[-20:]) / max(1, len(hits[-20:])))
        if log:
            log(f"  seed {seed} step {step}: loss {curve['loss'][-1]:.3f} right {a:.3f} "
                f"wrong {w:.3f} edited {e:.3f} recall {r:.3f} train-recall {curve['train_recall'][-1]:.3f}")
        return time.perf_counter() - te

    model.train()
    try:
        if curves:
            eval_s += point(0)
        for step in range(1, cfg.steps + 1):
            n_e = int(round(cfg.batch_size * cfg.entry_mix))
            rows = torch.randint(0, ids.shape[0], (cfg.batch_size - n_e,), generator=gen)
            b_ids, b_mask = ids[rows], mask[rows]
            labels = torch.full_like(b_ids, -100)
            labels[torch.arange(rows.shape[0]), pos[rows]] = answers[rows]
            gold = data.train_gold[rows]
            if n_e:
                er = torch.randint(0, data.entry_ids.shape[0], (n_e,), generator=gen)
                rel = torch.randint(0, len(RELATIONS), (n_e,), generator=gen)
                e_ids = data.entry_ids[er].clone()
                p = data.entry_pos[er, rel]
                e_ids[torch.arange(n_e), p] = tok.mask_token_id
                e_lab = torch.full_like(e_ids, -100)
                e_lab[torch.arange(n_e), p] = data.entry_vals[er, rel]
                W = max(e_ids.shape[1], b_ids.shape[1])
                padw = lambda t, v: torch.nn.functional.pad(t, (0, W - t.shape[1]), value=v)  # noqa: E731
                b_ids = torch.cat([padw(b_ids, tok.pad_token_id), padw(e_ids, tok.pad_token_id)])
                b_mask = torch.cat([padw(b_mask, 0), padw(data.entry_mask[er], 0)])
                labels = torch.cat([padw(labels, -100), padw(e_lab, -100)])
                gold = torch.cat([gold, data.entry_gold[er]])
            out = model(input_ids=b_ids, attention_mask=b_mask, labels=labels, output_retrieval=True)
            hits.append(float((out.retrieval[-1].indices.cpu() == gold[:, None]).any(1).float().mean()))
            _step(model, out.loss + align.loss(b_ids, b_mask), opt, refresher, cfg.sync_refresh, sched)
            losses.append(float(out.loss.detach()))
            if curves and (step % cfg.eval_every == 0 or step == cfg.steps):
                eval_s += point(step)
        refresher.wait()
    finally:
        refresher.close()
        align.close()
    wall = time.perf_counter() - t0 - eval_s
    return model, {"train_s": wall, "refreshes": refresher.refreshes, "skipped": refresher.skipped,
                   "curve": curve if curves else None, "final_loss": sum(losses[-50:]) / len(losses[-50:])}


# -------------------------------------------------------------------------- measurements


def adapt_to_domain_b(model, data: _Data, seed: int):
    """The paper's domain adaptation at this scale: B's memory plugged in and B's task learnt
    from ``n_b_train`` ships' queries (``b_steps`` steps, the same stack: stale search + fresh
    re-encode, keys refreshed by ``AsyncKeyRefresher``), no training on B's entries. Returns
    a trained copy; ``model`` is left as it is. The evaluated ships are never in a query."""
    from ..refresh import AsyncKeyRefresher

    cfg = data.cfg
    tok = data.tok
    ft = copy.deepcopy(model)
    mem_b = build_memory(data.texts["B"], tok, ft, "B")
    ft.set_memory(mem_b)
    refresher = AsyncKeyRefresher(ft, mem_b, interval=cfg.refresh_interval,
                                  priority="normal" if cfg.sync_refresh else "low")
    ids, mask, pos, answers = _encode_queries(tok, data.b_train_q)
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(ft.parameters(), lr=cfg.b_lr, weight_decay=0.01)
    ft.train()
    t0 = time.perf_counter()
    try:
        for _ in range(cfg.b_steps):
            rows = torch.randint(0, ids.shape[0], (cfg.batch_size,), generator=gen)
            labels = torch.full_like(ids[rows], -100)
            labels[torch.arange(rows.shape[0]), pos[rows]] = answers[rows]
            out = ft(input_ids=ids[rows], attention_mask=mask[rows], labels=labels)
            _step(ft, out.loss, opt, refresher, cfg.sync_refresh)
        refresher.wait()
    finally:
        refresher.close()
    ft.eval()
    return ft, time.perf_counter() - t0


def measure(model, data: _Data) -> dict:
    """Every held-out measurement of one trained model (no parameter changes; hashed)."""
    tok, kb = data.tok, data.kb
    model.eval()
    h0 = state_hash(model)
    out = {"chance": kb.chance(data.eval_q)}
    right = build_memory(data.texts["A"], tok, model, "A")
    out["accuracy_right_memory"], out["gold_recall"] = accuracy(
        model, right, tok, data.eval_q, gold=[q.entity for q in data.eval_q])
    wrong = build_memory(data.texts["unrelated"], tok, model, "unrelated")
    out["accuracy_wrong_memory"], _ = accuracy(model, wrong, tok, data.eval_q)

    # knowledge update: edit, re-encode only the edited entries, no training
    before_unedited, _ = accuracy(model, right, tok, data.unedited_q)
    keys_before = right.keys.clone()
    right.update(torch.tensor(data.edit_ids), data.edit_texts, tok)
    n_enc = right.encode(model, batch_size=1024, progress=False, only_stale=True)
    untouched = torch.ones(len(right), dtype=torch.bool)
    untouched[torch.tensor(data.edit_ids)] = False
    out["edit_reencoded_entries"] = n_enc
    out["edit_other_keys_unchanged"] = bool(torch.equal(right.keys[untouched], keys_before[untouched]))
    out["edit_follow_rate"], _ = accuracy(model, right, tok, data.edit_q)
    old = [data.kb.entities["A"][q.entity].attrs[q.relation] for q in data.edit_q]
    out["edit_old_answer_rate"], _ = accuracy(model, right, tok, data.edit_q, targets=old)
    after_unedited, _ = accuracy(model, right, tok, data.unedited_q)
    out["unedited_accuracy_before"] = before_unedited
    out["unedited_accuracy_after"] = after_unedited
    out["unedited_accuracy_drop"] = before_unedited - after_unedited

    # removal (on a fresh copy of the right memory)
    mem = build_memory(data.texts["A"], tok, model, "A")
    kept_before, _ = accuracy(model, mem, tok, data.kept_q)
    mem.remove(torch.tensor(data.remove_ids))
    out["removed_accuracy"], _ = accuracy(model, mem, tok, data.removed_q)
    out["removed_chance"] = kb.chance(data.removed_q)
    out["kept_accuracy_before"] = kept_before
    out["kept_accuracy_after"], _ = accuracy(model, mem, tok, data.kept_q)

    # domain adaptation. Zero-shot: no training on B at all, B's memory plugged in.
    gold_b = [q.entity for q in data.b_q]
    mem_b = build_memory(data.texts["B"], tok, model, "B")
    out["domain_b_zero_shot_accuracy"], out["domain_b_zero_shot_recall"] = accuracy(
        model, mem_b, tok, data.b_q, gold=gold_b)
    out["domain_b_chance"] = kb.chance(data.b_q)
    # The paper's protocol: B's task learnt on other ships (a copy of the model), then the
    # held-out ships with B's memory, with A's, and with B's entries in a second wording
    ft, out["domain_b_adapt_s"] = adapt_to_domain_b(model, data, data.cfg.seed)
    mem_b = build_memory(data.texts["B"], tok, ft, "B")
    out["domain_b_accuracy"], out["domain_b_gold_recall"] = accuracy(ft, mem_b, tok, data.b_q, gold=gold_b)
    mem_a = build_memory(data.texts["A"], tok, ft, "A")
    out["domain_b_with_a_memory"], _ = accuracy(ft, mem_a, tok, data.b_q)
    out["domain_a_accuracy_after_b"], _ = accuracy(ft, mem_a, tok, data.eval_q)
    mem_o = build_memory(data.texts["B_other_phrasing"], tok, ft, "B")
    out["domain_b_other_phrasing_accuracy"], out["domain_b_other_phrasing_recall"] = accuracy(
        ft, mem_o, tok, data.b_q, gold=gold_b)
    del ft
    out["params_unchanged"] = state_hash(model) == h0
    out["param_hash"] = h0
    return out


SUMMARY_FIELDS = ("accuracy_right_memory", "accuracy_wrong_memory", "gold_recall", "edit_follow_rate",
                  "unedited_accuracy_drop", "removed_accuracy", "domain_b_accuracy",
                  "domain_b_with_a_memory", "domain_b_zero_shot_accuracy",
                  "domain_b_other_phrasing_accuracy")


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def _tasks(cfg: QualityConfig) -> list[tuple[str, object]]:
    """The independent units of the experiment, in the order a single process runs them:
    ("seed", s) trains seed s with its curves and measurements; ("ablation", interval) and
    ("backend", name) train ``cfg.ablation_steps`` steps with seed ``cfg.seed``."""
    tasks = [("seed", cfg.seed + i) for i in range(cfg.seeds)]
    tasks += [("ablation", iv) for iv in cfg.ablation]
    if cfg.backend_check:
        tasks.append(("backend", "reference"))
    return tasks


def _task_name(task) -> str:
    kind, arg = task
    if kind == "ablation":
        return f"refresh every {arg}" if arg else "refresh never"
    return f"{kind} {arg}"


def _task_cost(cfg: QualityConfig, task) -> float:
    """Relative cost, to start the longest tasks first (benchmarks/NOTES.md, "Quality": a
    seed is ~2 ablation runs; a refresh costs ~1.5 steps)."""
    kind, arg = task
    if kind == "seed":
        return cfg.steps * 1.5
    interval = cfg.refresh_interval if kind == "backend" else arg
    return cfg.ablation_steps * (1 + (1.5 / interval if interval else 0))


def _run_task(cfg: QualityConfig, data: _Data, task, log=None) -> dict:
    """One unit of ``_tasks`` -> its row (with the curve of a seed run)."""
    kind, arg = task
    t0, c0 = time.perf_counter(), time.process_time()
    if kind == "seed":
        model, info = train(cfg, data, arg, curves=True, log=log)
        row = {"seed": arg, **measure(model, data), "train_s": info["train_s"],
               "final_loss": info["final_loss"], "refreshes": info["refreshes"]}
        out = {"row": row, "curve": info["curve"]}
    else:
        short = replace(cfg, steps=cfg.ablation_steps)
        if kind == "ablation":
            model, info = train(short, data, cfg.seed, refresh_interval=arg)
        elif kind == "backend":
            model, info = train(short, data, cfg.seed, backend=arg)
        else:
            raise ValueError(f"unknown quality task {task!r}")
        a, rec = _right(model, data)
        out = {"row": {"steps": short.steps, "accuracy_right_memory": a, "gold_recall": rec,
                       "train_s": info["train_s"], "refreshes": info["refreshes"]}}
    # the task's own wall and CPU time (CPU time: this process, refresh thread included)
    out["timing"] = {"task": _task_name(task), "wall_s": time.perf_counter() - t0,
                     "cpu_s": time.process_time() - c0, "threads": torch.get_num_threads()}
    return out


def _log_task(log, cfg, task, out) -> None:
    kind, arg = task
    r = out["row"]
    if kind == "seed":
        log(f"seed {arg}: " + ", ".join(f"{k} {r[k]:.3f}" for k in SUMMARY_FIELDS)
            + f", params_unchanged {r['params_unchanged']}, train {r['train_s']:.0f}s")
    elif kind == "ablation":
        log(f"{_task_name(task)} ({r['steps']} steps): accuracy {r['accuracy_right_memory']:.3f} "
            f"recall {r['gold_recall']:.3f} train {r['train_s']:.0f}s ({r['refreshes']} refreshes)")
    else:
        log(f"backend {arg} ({r['steps']} steps): accuracy {r['accuracy_right_memory']:.3f} "
            f"recall {r['gold_recall']:.3f} train {r['train_s']:.0f}s")


# Worker processes (jobs > 1): each builds the knowledge base once, then runs tasks.
_WORKER: dict = {}


def _ignore_sigint_and_follow_parent() -> None:
    import signal

    # Ctrl-C reaches the whole process group: the parent alone handles it (and terminates
    # the workers), so that a worker neither prints a traceback nor outlives it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:  # Linux: die with the parent even when it is killed without cleaning up
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_init(cfg: QualityConfig, threads: int, progress: bool) -> None:
    _ignore_sigint_and_follow_parent()
    torch.set_num_threads(threads)
    _WORKER["cfg"] = replace(cfg, threads=threads)
    _WORKER["data"] = _Data(cfg)
    _WORKER["progress"] = progress


def _worker_task(task) -> dict:
    name = _task_name(task)
    log = (lambda s: print(f"[{name}] {s.strip()}", flush=True)) if _WORKER["progress"] else None
    return _run_task(_WORKER["cfg"], _WORKER["data"], task, log=log)


def default_jobs() -> int:
    """Worker processes of ``pluglm bench --quality`` by default: one per usable core."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def run_in_processes(fn, args: list, jobs: int, *, names=None, initializer=None, initargs=(),
                     on_result=None) -> list:
    """``[fn(a) for a in args]`` in ``jobs`` worker processes (a ``spawn`` context: never a
    fork of a process whose torch threads are running), in the order given (submit the
    longest first). ``on_result(i, result)`` is called in this process as each finishes.

    A task that raises, or a worker that dies (killed, crashed, out of memory), raises a
    RuntimeError here naming the task; the other workers are then terminated, as they are
    on Ctrl-C (the workers ignore SIGINT and leave it to this process)."""
    import concurrent.futures as cf
    import multiprocessing as mp
    from concurrent.futures.process import BrokenProcessPool

    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive int, got {jobs!r}")
    names = list(names) if names is not None else [repr(a) for a in args]
    results = [None] * len(args)
    if not args:
        return results

    ex = cf.ProcessPoolExecutor(max_workers=min(jobs, len(args)), mp_context=mp.get_context("spawn"),
                                initializer=initializer or _ignore_sigint_and_follow_parent,
                                initargs=initargs if initializer else ())
    futures = {}
    ok = False
    try:
        futures = {ex.submit(fn, a): i for i, a in enumerate(args)}
        for fut in cf.as_completed(futures):
            i = futures[fut]
            try:
                results[i] = fut.result()
            except BrokenProcessPool as e:
                codes = sorted({p.exitcode for p in list(getattr(ex, "_processes", {}).values())
                                if p.exitcode not in (None, 0)})
                running = [names[futures[f]] for f in futures if not f.done() or f is fut]
                raise RuntimeError(
                    f"a quality worker process died (exit code {codes or 'unknown'}) while running "
                    f"one of: {', '.join(running)}; the run is abandoned") from e
            except Exception as e:
                raise RuntimeError(f"quality task {names[i]!r} failed in its worker process: "
                                   f"{type(e).__name__}: {e}") from e
            if on_result is not None:
                on_result(i, results[i])
        ok = True
    finally:
        if not ok:  # an error or Ctrl-C: stop everything now, leave no process behind
            for f in futures:
                f.cancel()
            procs = list(getattr(ex, "_processes", {}).values())
            for p in procs:
                if p.is_alive():
                    p.terminate()
            ex.shutdown(wait=False, cancel_futures=True)
            for p in procs:
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join()
        else:
            ex.shutdown(wait=True)
    return results


def run_quality(cfg: QualityConfig, log=print, jobs: int = 1) -> dict:
    """The whole experiment (see the module docstring) -> the result dict of quality.json.

    ``jobs`` > 1 runs its independent units (each seed with its measurements, each ablation
    interval, the backend check) in that many ``spawn`` worker processes, longest first, each
    with ``cfg.threads`` (default 1) torch threads; each unit depends only on its seed, so the
    numbers are those of ``jobs=1`` at the same thread count (benchmarks/NOTES.md, "Quality").
    With a single unit (``--quick``) it runs in this process, at 1 thread unless
    ``cfg.threads`` says otherwise. ``jobs=1``: everything in this process, ``cfg.threads``
    (None: torch's setting).
    """
    t_start = time.perf_counter()
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive int, got {jobs!r}")
    progress = log is not None
    log = log or (lambda *_: None)
    tasks = _tasks(cfg)
    if jobs > 1 and not cfg.threads:
        # one torch thread per unit: two barely beat one at d=128 and a 2-thread team stalls
        # whenever another process takes a core (benchmarks/NOTES.md, "Quality")
        cfg = replace(cfg, threads=1)
    jobs = min(jobs, len(tasks))
    if jobs == 1:  # one unit (--quick) or jobs=1: in this process
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        data = _Data(cfg)
        log(f"knowledge base: {cfg.n_a} A entities ({cfg.heldout} held out), {cfg.n_b} B, "
            f"{len(data.tok)} words; {len(data.train_q)} training queries, {len(data.eval_q)} eval")
        outs = []
        for task in tasks:
            outs.append(_run_task(cfg, data, task, log=log))
            _log_task(log, cfg, task, outs[-1])
        machine = _machine()
    else:
        threads = cfg.threads
        order = sorted(range(len(tasks)), key=lambda i: -_task_cost(cfg, tasks[i]))
        log(f"{len(tasks)} tasks in {jobs} worker processes x {threads} thread(s), longest first: "
            + ", ".join(_task_name(tasks[i]) for i in order))
        got = run_in_processes(
            _worker_task, [tasks[i] for i in order], jobs, names=[_task_name(tasks[i]) for i in order],
            initializer=_worker_init, initargs=(cfg, threads, progress),
            on_result=lambda j, out: _log_task(log, cfg, tasks[order[j]], out))
        outs = [None] * len(tasks)
        for j, i in enumerate(order):
            outs[i] = got[j]
        machine = {**_machine(), "threads": threads}
    machine["jobs"] = jobs
    by_task = dict(zip(tasks, outs))

    per_seed, curves = [], {}
    for task in tasks:
        if task[0] == "seed":
            per_seed.append(by_task[task]["row"])
            curves[str(task[1])] = by_task[task]["curve"]
    result = {"config": asdict(cfg), "machine": machine, "per_seed": per_seed, "curves": curves}
    for k in SUMMARY_FIELDS + ("chance", "domain_b_chance", "domain_a_accuracy_after_b", "removed_chance",
                               "kept_accuracy_before", "kept_accuracy_after", "edit_old_answer_rate"):
        vals = [r[k] for r in per_seed]
        result[k] = sum(vals) / len(vals)
        if len(vals) > 1:
            result[k + "_min"], result[k + "_max"] = min(vals), max(vals)
    result["params_unchanged"] = all(r["params_unchanged"] for r in per_seed)

    ablation = [{"refresh_interval": iv, **by_task[("ablation", iv)]["row"]} for iv in cfg.ablation]
    result["refresh_ablation"] = ablation
    if cfg.backend_check:
        auto = next((r for r in ablation if r["refresh_interval"] == cfg.refresh_interval), None)
        b = by_task[("backend", "reference")]["row"]
        result["backend_check"] = {"backend": "reference", "seed": cfg.seed, "steps": b["steps"],
                                   "accuracy_right_memory": b["accuracy_right_memory"],
                                   "gold_recall": b["gold_recall"], "train_s": b["train_s"],
                                   "auto_accuracy_right_memory": auto and auto["accuracy_right_memory"],
                                   "auto_train_s": auto and auto["train_s"]}
    result["tasks"] = [o["timing"] for o in outs]
    result["total_s"] = time.perf_counter() - t_start
    return result


def _right(model, data):
    mem = build_memory(data.texts["A"], data.tok, model, "A")
    return accuracy(model, mem, data.tok, data.eval_q, gold=[q.entity for q in data.eval_q])


# ------------------------------------------------------------------------------ reports


def _pct(v):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def to_markdown(result: dict) -> str:
    per = result["per_seed"]
    seeds = ", ".join(str(r["seed"]) for r in per)
    rng = lambda k: (f" ({_pct(result[k + '_min'])}-{_pct(result[k + '_max'])})"  # noqa: E731
                     if k + "_min" in result else "")
    ch = result["chance"]
    rows = [
        ("accuracy, right memory", "accuracy_right_memory", ">= 90%"),
        ("accuracy, unrelated memory", "accuracy_wrong_memory", f"<= chance + 5 = {_pct(ch + 0.05)}"),
        ("gold entry in top-N", "gold_recall", ">= 95%"),
        ("edits followed (no training)", "edit_follow_rate", ">= 90%"),
        ("unedited accuracy drop", "unedited_accuracy_drop", "<= 2 points"),
        ("removed entries' accuracy", "removed_accuracy", f"chance ({_pct(result['removed_chance'])})"),
        ("domain B (ships), B's task learnt on other ships, B's memory", "domain_b_accuracy", ">= 80%"),
        ("domain B, same model, A's memory", "domain_b_with_a_memory",
         f"<= chance + 5 = {_pct(result['domain_b_chance'] + 0.05)}"),
        ("domain B, same model, B's entries in a second wording", "domain_b_other_phrasing_accuracy",
         "(no target)"),
        ("domain B zero-shot (no training on B), B's memory", "domain_b_zero_shot_accuracy",
         "(no target)"),
    ]
    m = result["machine"]
    c = result["config"]
    par = (f"{m['jobs']} worker processes x {m['threads']} thread(s)" if m.get("jobs", 1) > 1
           else f"{m['threads']} threads")
    lines = [f"Quality (held-out entities), seeds {seeds}; {m['cpu']}, {par}, "
             f"torch {m['torch']}. Model d={c['hidden']}, {c['layers']} layers (top one a memory layer), "
             f"N={c['memory_k']}, {c['steps']} steps x {c['batch_size']}; memory {c['n_a']} entries; "
             f"chance (best constant answer) {_pct(ch)}.", "",
             "| measurement | mean (min-max over seeds) | target |", "|---|---|---|"]
    for label, k, target in rows:
        lines.append(f"| {label} | {_pct(result[k])}{rng(k)} | {target} |")
    lines.append(f"| parameters and buffers bit-identical | {result['params_unchanged']} | True |")
    lines.append(f"| unrelated entries' accuracy after removal | kept {_pct(result['kept_accuracy_after'])} "
                 f"(before {_pct(result['kept_accuracy_before'])}) | unchanged |")
    if result.get("refresh_ablation"):
        lines += ["", f"Refresh ablation, seed {result['config']['seed']}, "
                      f"{result['refresh_ablation'][0]['steps']} steps each (wall times on a shared machine "
                      f"include contention):", "",
                  "| key refresh | accuracy | gold in top-N | train wall time | refreshes |",
                  "|---|---|---|---|---|"]
        for r in result["refresh_ablation"]:
            iv = r["refresh_interval"]
            lines.append(f"| {'never' if iv == 0 else f'every {iv} steps'} | {_pct(r['accuracy_right_memory'])} | "
                         f"{_pct(r['gold_recall'])} | {r['train_s']:.0f} s | {r['refreshes']} |")
    if result.get("backend_check"):
        b = result["backend_check"]
        lines += ["", f"Backend check (seed {b['seed']}, {b['steps']} steps): kernel_backend='reference' "
                      f"{_pct(b['accuracy_right_memory'])} vs 'auto' {_pct(b['auto_accuracy_right_memory'])} "
                      f"(train {b['train_s']:.0f} s vs {b['auto_train_s'] or 0:.0f} s)."]
    lines += ["", f"Total wall time {result['total_s'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def plot(result: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"right": "tab:green", "wrong": "tab:red", "edited": "tab:blue", "recall": "tab:gray"}
    labels = {"right": "right memory", "wrong": "unrelated memory", "edited": "after edits (new value)",
              "recall": "gold in top-N"}
    for j, (seed, c) in enumerate(result["curves"].items()):
        for k in ("right", "wrong", "edited", "recall"):
            ax.plot(c["step"], c[k], color=colors[k], alpha=0.85, lw=1.3,
                    ls="--" if k == "recall" else "-", label=labels[k] if j == 0 else None)
    ax.axhline(result["chance"], color="k", lw=0.8, ls=":", label="chance")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    ax.set_title(f"PlugLM reads its memory ({len(result['curves'])} seeds)\n{result['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    path = Path(out_dir) / "quality_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def write_all(result: dict, out_dir) -> list[Path]:
    from .report import write_results

    return write_results(result, out_dir, "quality", to_markdown, plot)


__all__ = ["QualityConfig", "accuracy", "measure", "run_in_processes", "run_quality", "state_hash", "train",
           "write_all"]


def main(args) -> int:
    """``pluglm bench --quality [--quick] [--seed N] [--jobs N] --out DIR``."""
    cfg = QualityConfig.make(args.quick, args.seed)
    jobs = getattr(args, "jobs", None) or default_jobs()
    result = run_quality(cfg, log=None if args.no_progress else (lambda s: print(s, flush=True)), jobs=jobs)
    print(to_markdown(result))
    written = write_all(result, Path(args.out))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
