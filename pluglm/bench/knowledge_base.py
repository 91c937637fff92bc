"""An invented knowledge base for the quality experiment (docs/design.md §1: what a PlugLM
must learn is to *read* its memory; these facts exist nowhere else, so only reading the
memory can answer them).

``make_knowledge_base(seed)`` builds, from one seed, everything the experiment needs:

* two domains, A and B, of different entities (no B entity is an A entity; B's names are
  new combinations of the first and last names the tokenizer knows, as a subword tokenizer
  would spell a new domain's names with known pieces). They share the relations, the entry
  phrasing and the closed value sets, i.e. the answer vocabulary: a masked-LM head can only
  name words it was trained to produce, so a domain whose answers are words the head never
  emitted tests the output vocabulary, not the reading of a plugged-in memory. B's entries
  can also be written in another phrasing (``OTHER_PHRASING``: other words, another order)
  to measure how far the reader transfers to unseen entry wording (benchmarks/NOTES.md,
  "Quality");
* a memory entry per entity in ONE phrasing ("zorvath quill was born in ketterby ,
  works as a glassblower at brundle and likes ochre .");
* queries for one attribute in OTHER phrasings, the answer replaced by [MASK] ("where was
  zorvath quill born ? [MASK] ."), so the gap in surface form must be bridged by retrieval;
* a split of domain A into training entities (queries used for training) and held-out
  entities (facts in the memory, never in a training query): evaluation uses the latter;
* a set of unrelated entities (same format, names not used by A or B) for the
  wrong-memory control.

Every word is one token of ``build_tokenizer(kb)`` (a word-level BERT-style tokenizer
built in code). Everything is lower case and space separated.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..memory.tokenize import WORD_LEVEL_SPECIAL

SPECIAL = WORD_LEVEL_SPECIAL

# Relations: (name, entry fragment, query templates). {v} is the value, {n} the name.
# The entry states all attributes in one sentence; queries use other words.
RELATIONS = (
    ("birthplace", "was born in {v}",
     ("where was {n} born ? [MASK] .", "{n} 's hometown is [MASK] .", "the hometown of {n} is [MASK] .")),
    ("occupation", "works as a {v}",
     ("what does {n} do for a living ? [MASK] .", "{n} 's job is [MASK] .", "by trade {n} is a [MASK] .")),
    ("employer", "at {v}",
     ("who employs {n} ? [MASK] .", "{n} 's employer is [MASK] .", "the company of {n} is [MASK] .")),
    ("colour", "likes {v}",
     ("which colour does {n} prefer ? [MASK] .", "{n} 's favourite colour is [MASK] .",
      "the colour {n} loves most is [MASK] .")),
)
ENTRY_TEMPLATE = "{n} was born in {birthplace} , works as a {occupation} at {employer} and likes {colour} ."
# Another wording of the same facts (other words, another order; queries unchanged): the
# phrasing-transfer measurement of domain B.
OTHER_PHRASING = ("{n} , a native of {birthplace} , is employed by {employer} as a {occupation} ; "
                  "favourite colour {colour} .")

_ONSETS = ("b", "br", "c", "ch", "d", "dr", "f", "g", "gr", "h", "j", "k", "kr", "l", "m", "n",
           "p", "pr", "qu", "r", "s", "sh", "st", "t", "th", "tr", "v", "w", "z", "zh")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ai", "ou", "ei", "ia")
_CODAS = ("", "n", "r", "l", "th", "x", "sk", "nd", "m", "ck", "ss", "rt")


@dataclass
class Entity:
    name: str
    attrs: dict  # relation name -> value word
    domain: str

    def entry(self, attrs: dict | None = None, template: str = ENTRY_TEMPLATE) -> str:
        a = self.attrs if attrs is None else attrs
        return template.format(n=self.name, **a)


@dataclass
class Query:
    text: str          # with one [MASK]
    answer: str        # the value word
    entity: int        # index into the domain's entity list (= its memory entry id)
    relation: str


@dataclass
class KnowledgeBase:
    seed: int
    values: dict                      # domain -> relation -> value words (A and B share them)
    entities: dict                    # "A", "B", "unrelated" -> list[Entity]
    train_entities: list = field(default_factory=list)     # indices into entities["A"]
    heldout_entities: list = field(default_factory=list)   # indices into entities["A"]

    def entries(self, domain: str, template: str = ENTRY_TEMPLATE) -> list[str]:
        """Memory texts of a domain, entry i = entity i."""
        return [e.entry(template=template) for e in self.entities[domain]]

    def queries(self, domain: str, entity_ids, rng: random.Random, per_relation: int = 1,
                relations=None) -> list[Query]:
        """``per_relation`` queries (distinct templates) per entity and relation."""
        out = []
        rels = [r for r in RELATIONS if relations is None or r[0] in relations]
        for i in entity_ids:
            e = self.entities[domain][i]
            for name, _, templates in rels:
                for t in rng.sample(templates, min(per_relation, len(templates))):
                    out.append(Query(t.format(n=e.name), e.attrs[name], i, name))
        return out

    def other_value(self, domain: str, relation: str, value: str, rng: random.Random) -> str:
        choices = [v for v in self.values[domain][relation] if v != value]
        return rng.choice(choices)

    def words(self) -> list[str]:
        ws = set()
        for ents in self.entities.values():
            for e in ents:
                ws.update(e.entry().split())
                ws.update(e.entry(template=OTHER_PHRASING).split())
        for _, _, templates in RELATIONS:
            for t in templates:
                ws.update(w for w in t.split() if w not in ("{n}", "[MASK]"))
        for dom in self.values.values():
            for vals in dom.values():
                ws.update(vals)
        return sorted(ws - set(SPECIAL))

    def chance(self, queries: list[Query], domain: str = "A") -> float:
        """Accuracy of the best constant answer per relation on ``queries`` (majority class):
        what a model that ignores the memory can reach at best."""
        by_rel: dict = {}
        for q in queries:
            by_rel.setdefault(q.relation, []).append(q.answer)
        hits = 0
        for answers in by_rel.values():
            hits += max(answers.count(v) for v in set(answers))
        return hits / max(1, len(queries))


def _words(rng: random.Random, n: int, taken: set, syllables=(2, 3)) -> list[str]:
    out = []
    while len(out) < n:
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.choice(syllables) - 1))
        w += rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
        if w not in taken and len(w) > 3:
            taken.add(w)
            out.append(w)
    return out


def make_knowledge_base(seed: int = 0, *, n_a: int = 3000, n_b: int = 1000,
                        n_unrelated: int = 3000, heldout: int = 1000, name_pool: int = 90,
                        value_counts=(48, 48, 48, 24)) -> KnowledgeBase:
    """The whole knowledge base from ``seed`` (see the module docstring).

    n_a / n_b / n_unrelated: entities of domain A, B and the unrelated control set.
    heldout: domain-A entities whose queries are never trained on. name_pool: first and
    last names per pool (names are "first last", every entity's distinct; all three sets draw
    from the same pools). value_counts: values per relation (shared by both domains; a few
    hundred in all).
    """
    if heldout >= n_a:
        raise ValueError(f"heldout ({heldout}) must be < n_a ({n_a})")
    if n_a + n_unrelated + n_b > name_pool * name_pool:
        raise ValueError(f"name_pool={name_pool} gives {name_pool ** 2} names; need "
                         f"n_a + n_unrelated + n_b = {n_a + n_unrelated + n_b}")
    if len(value_counts) != len(RELATIONS):
        raise ValueError(f"value_counts needs one count per relation ({len(RELATIONS)}), got {value_counts!r}")
    rng = random.Random(seed)
    taken = {w for _, frag, ts in RELATIONS for t in (frag, *ts) for w in t.split()}
    taken |= set(ENTRY_TEMPLATE.split()) | set(OTHER_PHRASING.split())
    shared = {r[0]: _words(rng, c, taken) for r, c in zip(RELATIONS, value_counts)}
    values = {"A": shared, "B": shared}
    first, last = _words(rng, name_pool, taken), _words(rng, name_pool, taken)
    allnames = [f"{f} {l}" for f in first for l in last]
    picked = rng.sample(allnames, n_a + n_b + n_unrelated)

    def ents(d, nm, vals_domain):
        return [Entity(n, {r: rng.choice(values[vals_domain][r]) for r in values[vals_domain]}, d)
                for n in nm]

    entities = {"A": ents("A", picked[:n_a], "A"),
                "B": ents("B", picked[n_a:n_a + n_b], "B"),
                "unrelated": ents("unrelated", picked[n_a + n_b:], "A")}
    order = list(range(n_a))
    rng.shuffle(order)
    return KnowledgeBase(seed, values, entities, sorted(order[heldout:]), sorted(order[:heldout]))


def build_tokenizer(kb: KnowledgeBase):
    """Word-level BERT-style tokenizer ([CLS] x [SEP]) over every word of ``kb``, built in code."""
    from ..memory.tokenize import word_level_tokenizer

    return word_level_tokenizer(kb.words())


__all__ = ["ENTRY_TEMPLATE", "Entity", "KnowledgeBase", "OTHER_PHRASING", "Query", "RELATIONS",
           "build_tokenizer", "make_knowledge_base"]
