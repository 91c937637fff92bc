"""An invented knowledge base for the quality experiment (docs/design.md §1: what a PlugLM
must learn is to *read* its memory; these facts exist nowhere else, so only reading the
memory can answer them).

``make_knowledge_base(seed)`` builds, from one seed, everything the experiment needs:

* domain A: people ("zorvath quill") with four attributes: birthplace (a city), occupation
  (a job), employer (a company) and favourite colour. One memory entry per person, in one
  of ``ENTRY_TEMPLATES_A`` (the attributes in different orders and words; each entity keeps
  its one wording): "zorvath quill was born in ketterby , works as a glassblower at brundle
  and likes ochre .";
* queries for one attribute in OTHER phrasings, the answer replaced by [MASK] ("where was
  zorvath quill born ? [MASK] ."), so the gap in surface form must be bridged by retrieval;
* a split of domain A into training entities (queries used for training) and held-out
  entities (facts in the memory, never in a training query): evaluation uses the latter;
* domain B: another entity type, ships ("the ship vaelor drisk"), with other attributes:
  home port, owner and hull colour, stated in B's own entry wording and asked in B's own
  query wording, none of which any domain-A text contains. What B shares with A is what a
  pretrained language model brings to a new domain: the name pieces (B's names are new
  combinations of the first and last names the tokenizer knows, as a subword tokenizer
  spells a new domain's names with known pieces) and the answer vocabulary by TYPE: a
  home port is one of the cities, an owner one of the companies, a hull colour one of the
  colours (a masked-LM head trained from scratch can only name words it was trained to
  emit). Some questions of both domains name the answer's type ("the city of ... is").
  ``pluglm.bench.quality`` measures B both ways: zero-shot, and as the paper adapts to a
  domain (the task learnt on a few ships' queries with B's memory plugged in; the
  evaluated ships' facts are only in B's memory);
* a set of unrelated people (same format as A, names not used by A or B) for the
  wrong-memory control.

Every word is one token of ``build_tokenizer(kb)`` (a word-level BERT-style tokenizer
built in code). Everything is lower case and space separated.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..memory.tokenize import WORD_LEVEL_SPECIAL

SPECIAL = WORD_LEVEL_SPECIAL

# Relations of a domain: (name, value type, query templates). {n} is the name.
RELATIONS_A = (
    ("birthplace", "city",
     ("where was {n} born ? [MASK] .", "{n} 's hometown is [MASK] .", "in which city was {n} born ? [MASK] .",
      "the home city of {n} is [MASK] .", "the city of {n} is [MASK] .")),
    ("occupation", "job",
     ("what does {n} do for a living ? [MASK] .", "{n} 's job is [MASK] .", "which job does {n} have ? [MASK] .",
      "by trade {n} is a [MASK] .", "the job of {n} is [MASK] .")),
    ("employer", "company",
     ("who employs {n} ? [MASK] .", "{n} 's employer is [MASK] .", "which company does {n} work for ? [MASK] .",
      "the company of {n} is [MASK] .")),
    ("colour", "colour",
     ("which colour does {n} prefer ? [MASK] .", "{n} 's favourite colour is [MASK] .",
      "the colour {n} loves most is [MASK] .", "the colour of {n} is [MASK] .")),
)
RELATIONS = RELATIONS_A  # the training domain's relations
RELATIONS_B = (
    ("home_port", "city",
     ("from which city does the ship {n} sail ? [MASK] .",
      "the ship {n} has its home port in the city of [MASK] .", "the city of the ship {n} is [MASK] .")),
    ("owner", "company",
     ("which company owns the ship {n} ? [MASK] .", "the ship {n} is owned by the company [MASK] .",
      "the company of the ship {n} is [MASK] .")),
    ("hull_colour", "colour",
     ("which colour is the hull of the ship {n} ? [MASK] .",
      "the ship {n} has a hull of the colour [MASK] .", "the colour of the ship {n} is [MASK] .")),
)
# Domain A's entry wordings: each entity's entry uses one, drawn from its seed. The same
# four phrases in four orders (a Latin square: every attribute at every place once), so
# that the reader learns to find an attribute by what its word is, not where it stands
# (trained on one fixed layout, a reader read 4.5% of B's entries written in another
# order), while every A entry holds the same bag of words: wordings that differed in their
# words gave each wording its own offset in key space, and the top-N then came from the
# query's favourite wording (gold recall 24%, benchmarks/NOTES.md, "Quality").
_A_PHRASES = {"b": "was born in {birthplace}", "o": "works as a {occupation}",
              "e": "is employed by {employer}", "c": "likes {colour}"}
ENTRY_TEMPLATES_A = tuple(
    "{n} " + " , ".join(_A_PHRASES[k] for k in order[:3]) + " and " + _A_PHRASES[order[3]] + " ."
    for order in ("boec", "oecb", "ecbo", "cboe"))
ENTRY_TEMPLATE = ENTRY_TEMPLATES_A[0]
# Domain B's entry wording (no word of it but the values and names is in any A text), and a
# second B wording (other order, other words) for the phrasing-transfer measurement.
ENTRY_TEMPLATES_B = (
    "the ship {n} sails out of {home_port} for {owner} with a {hull_colour} hull .",
)
OTHER_PHRASING = "painted {hull_colour} , the ship {n} is run by {owner} from the harbour of {home_port} ."
DOMAINS = {"A": (RELATIONS_A, ENTRY_TEMPLATES_A), "B": (RELATIONS_B, ENTRY_TEMPLATES_B),
           "unrelated": (RELATIONS_A, ENTRY_TEMPLATES_A)}
VALUE_TYPES = ("city", "job", "company", "colour")

_ONSETS = ("b", "br", "c", "ch", "d", "dr", "f", "g", "gr", "h", "j", "k", "kr", "l", "m", "n",
           "p", "pr", "qu", "r", "s", "sh", "st", "t", "th", "tr", "v", "w", "z", "zh")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ai", "ou", "ei", "ia")
_CODAS = ("", "n", "r", "l", "th", "x", "sk", "nd", "m", "ck", "ss", "rt")


@dataclass
class Entity:
    name: str
    attrs: dict  # relation name -> value word
    domain: str
    template: str = ENTRY_TEMPLATE  # this entity's entry wording

    def entry(self, attrs: dict | None = None, template: str | None = None) -> str:
        a = self.attrs if attrs is None else attrs
        return (self.template if template is None else template).format(n=self.name, **a)


@dataclass
class Query:
    text: str          # with one [MASK]
    answer: str        # the value word
    entity: int        # index into the domain's entity list (= its memory entry id)
    relation: str


@dataclass
class KnowledgeBase:
    seed: int
    values: dict                      # domain -> relation -> value words (drawn from shared pools by type)
    entities: dict                    # "A", "B", "unrelated" -> list[Entity]
    train_entities: list = field(default_factory=list)     # indices into entities["A"]
    heldout_entities: list = field(default_factory=list)   # indices into entities["A"]

    def entries(self, domain: str, template: str | None = None) -> list[str]:
        """Memory texts of a domain, entry i = entity i (each in its own wording, or all in
        ``template``)."""
        return [e.entry(template=template) for e in self.entities[domain]]

    def queries(self, domain: str, entity_ids, rng: random.Random, per_relation: int = 1,
                relations=None) -> list[Query]:
        """``per_relation`` queries (distinct templates) per entity and relation."""
        out = []
        rels = [r for r in DOMAINS[domain][0] if relations is None or r[0] in relations]
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
        for rels, templates in DOMAINS.values():
            for t in (*templates, OTHER_PHRASING):
                ws.update(w for w in t.split() if not w.startswith("{"))
            for _, _, qs in rels:
                for t in qs:
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


def _template_words() -> set:
    ws = set(OTHER_PHRASING.split())
    for rels, templates in DOMAINS.values():
        for t in templates:
            ws.update(t.split())
        for _, _, qs in rels:
            for t in qs:
                ws.update(t.split())
    return ws


def make_knowledge_base(seed: int = 0, *, n_a: int = 3000, n_b: int = 1000,
                        n_unrelated: int = 3000, heldout: int = 1000, name_pool: int = 90,
                        value_counts=(48, 48, 48, 24)) -> KnowledgeBase:
    """The whole knowledge base from ``seed`` (see the module docstring).

    n_a / n_b / n_unrelated: entities of domain A, B and the unrelated control set.
    heldout: domain-A entities whose queries are never trained on. name_pool: first and
    last names per pool (names are "first last", every entity's distinct; all three sets draw
    from the same pools). value_counts: words per value type (city, job, company, colour;
    a few hundred in all), the pools both domains draw their answers from.
    """
    if heldout >= n_a:
        raise ValueError(f"heldout ({heldout}) must be < n_a ({n_a})")
    if n_a + n_unrelated + n_b > name_pool * name_pool:
        raise ValueError(f"name_pool={name_pool} gives {name_pool ** 2} names; need "
                         f"n_a + n_unrelated + n_b = {n_a + n_unrelated + n_b}")
    if len(value_counts) != len(VALUE_TYPES) or any(int(c) < 2 for c in value_counts):
        raise ValueError(f"value_counts needs one count >= 2 per value type {VALUE_TYPES}, "
                         f"got {value_counts!r}")
    rng = random.Random(seed)
    taken = _template_words()
    pools = {t: _words(rng, int(c), taken) for t, c in zip(VALUE_TYPES, value_counts)}
    values = {d: {name: pools[vtype] for name, vtype, _ in DOMAINS[d][0]} for d in ("A", "B")}
    first, last = _words(rng, name_pool, taken), _words(rng, name_pool, taken)
    allnames = [f"{f} {l}" for f in first for l in last]
    picked = rng.sample(allnames, n_a + n_b + n_unrelated)

    def ents(d, nm, vals_domain):
        rels, templates = DOMAINS[d]
        return [Entity(n, {r[0]: rng.choice(values[vals_domain][r[0]]) for r in rels}, d,
                       rng.choice(templates)) for n in nm]

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


__all__ = ["DOMAINS", "ENTRY_TEMPLATE", "ENTRY_TEMPLATES_A", "ENTRY_TEMPLATES_B", "Entity", "KnowledgeBase",
           "OTHER_PHRASING", "Query", "RELATIONS", "RELATIONS_A", "RELATIONS_B", "VALUE_TYPES",
           "build_tokenizer", "make_knowledge_base"]
