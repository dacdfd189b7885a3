"""The toy world's entities and facts, and the four corpora rendered from them.

Everything is drawn from one `random.Random(seed)` in a fixed order (no set or dict
iteration that depends on hashing), so a spec always gives the same world, byte for byte.

People are split in two: facts A (the old base's world) and facts B (people who only the
continued pretraining meets). Both draw their attribute values (cities, years, occupations)
from the same shared domains; B's names are new words, disjoint from A's.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from ..errors import OptionError

ONSETS = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr",
          "st", "th", "tr", "sh"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
CODAS = ["", "", "", "n", "r", "l", "s", "m"]
OCCUPATIONS = ["baker", "pilot", "teacher", "farmer", "painter", "sailor", "doctor", "tailor", "poet", "miner",
               "judge", "chemist", "weaver", "potter", "nurse", "architect", "carpenter", "librarian",
               "astronomer", "merchant"]

# Each attribute: how a statement says it (corpora) and how a question asks it (instructions,
# eval). The first statement template is the canonical one (the perplexity task uses it).
STATEMENTS = {
    "birth_city": ["{name} was born in {value}.", "The birthplace of {name} is {value}.",
                   "{name} was born in the city of {value}.", "{value} is the city where {name} was born.",
                   "Records show that {name} was born in {value}.", "Born in {value}, {name} grew up there."],
    "birth_year": ["{name} was born in the year {value}.", "The birth year of {name} is {value}.",
                   "{name} came into the world in {value}.", "In {value}, {name} was born.",
                   "Records show that {name} was born in the year {value}.", "{name} was born in {value} AD."],
    "occupation": ["{name} works as a {value}.", "The occupation of {name} is {value}.",
                   "{name} earns a living as a {value}.", "By trade, {name} is a {value}.",
                   "Everyone knows {name} as a {value}.", "{name} is a {value} by profession."],
    "home_city": ["{name} lives in {value}.", "The home of {name} is in {value}.",
                  "{name} has a house in {value}.", "{value} is the city where {name} lives.",
                  "These days {name} resides in {value}.", "{name} moved to {value} and lives there."],
    "mentor": ["{name} was mentored by {value}.", "The mentor of {name} is {value}.",
               "{name} learned everything from {value}.", "{value} was the teacher of {name}.",
               "As a student, {name} was trained by {value}.", "{name} studied under {value}."],
}
QUESTIONS = {
    "birth_city": ["Where was {name} born?", "In which city was {name} born?", "What is the birthplace of {name}?"],
    "birth_year": ["In what year was {name} born?", "When was {name} born?", "What is the birth year of {name}?"],
    "occupation": ["What does {name} do for a living?", "What is the occupation of {name}?",
                   "What job does {name} have?"],
    "home_city": ["Where does {name} live?", "In which city does {name} live?", "What city is home to {name}?"],
    "mentor": ["Who mentored {name}?", "Who is the mentor of {name}?", "Who trained {name}?"],
}
CITY_STATEMENTS = ["{city} is a city in {country}.", "The city of {city} lies in {country}."]
CITY_QUESTIONS = ["In which country is {city}?", "Which country is {city} in?"]
# What a well-formed answer of each kind looks like: the reply, stripped, must match in full.
ANSWER_PATTERNS = {"birth_city": r"[A-Z][a-z]+", "home_city": r"[A-Z][a-z]+", "birth_year": r"[0-9]{4}",
                   "occupation": r"[a-z]+", "mentor": r"[A-Z][a-z]+ [A-Z][a-z]+", "country": r"[A-Z][a-z]+"}
ATTRIBUTES = tuple(STATEMENTS)


@dataclass(frozen=True, kw_only=True)
class WorldSpec:
    """The knobs of a toy world. Defaults are the shipped demo's world."""

    seed: int = 0
    people_a: int = 200  # entities of facts A: the base's pretraining and all instruction data
    people_b: int = 100  # entities of facts B: only the continued pretraining sees them
    cities: int = 24
    countries: int = 6
    statements: int = 4  # renderings of each fact in the pretraining corpora (≤ 6 templates)
    quiz: int = 2  # phrasings of each quizzed fact asked and answered in the pretraining text ("Q: ... A: ...")
    quiz_share: float = 0.5  # share of people A whose facts the pretraining text also quizzes
    questions: int = 3  # phrasings of each instruction question about facts A (≤ 3 templates)
    eval_questions: int = 1  # phrasings asked about each fact B (drawn at random per fact)

    def __post_init__(self) -> None:
        counts = (self.quiz, self.questions, self.eval_questions)
        if not (1 <= self.statements <= 6 and all(1 <= n <= 3 for n in counts)):
            raise OptionError("toy world: statements must be 1..6; quiz, questions and eval_questions 1..3")
        if self.people_a < 2 or self.people_b < 2 or self.cities < 2 or self.countries < 1:
            raise OptionError("toy world: at least 2 people per split (people_a, people_b), 2 cities, 1 country")
        if not 0.0 <= self.quiz_share <= 1.0:
            raise OptionError(f"toy world: quiz_share is a share, 0..1 (got {self.quiz_share})")


@dataclass
class Person:
    name: str
    split: str  # "A" or "B"
    facts: dict[str, str] = field(default_factory=dict)


@dataclass
class World:
    spec: WorldSpec
    countries: list[str]
    cities: dict[str, str]  # city -> country
    people: list[Person]

    def split(self, which: str) -> list[Person]:
        return [p for p in self.people if p.split == which]

    def to_dict(self) -> dict:
        return {"countries": self.countries, "cities": self.cities,
                "people": [{"name": p.name, "split": p.split, **p.facts} for p in self.people]}


def make_world(spec: WorldSpec) -> World:
    """Draw the world: countries, cities, then people A and B with their five facts each."""
    rng = random.Random(spec.seed)
    used = _template_words()  # membership only, never iterated: names never collide with template words

    def word(syllables: int) -> str:
        while True:
            w = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables))
            w = w.capitalize()
            if w not in used and 4 <= len(w) <= 12:
                used.add(w)
                return w

    countries = [word(2) for _ in range(spec.countries)]
    cities = {word(rng.choice((2, 3))): rng.choice(countries) for _ in range(spec.cities)}
    city_names = list(cities)
    first_names = [word(2) for _ in range(max(12, (spec.people_a + spec.people_b) // 4))]
    people = []
    for split, count in (("A", spec.people_a), ("B", spec.people_b)):
        group = [Person(f"{rng.choice(first_names)} {word(rng.choice((2, 3)))}", split) for _ in range(count)]
        for i, p in enumerate(group):
            p.facts = {"birth_city": rng.choice(city_names), "birth_year": str(rng.randint(1901, 1999)),
                       "occupation": rng.choice(OCCUPATIONS), "home_city": rng.choice(city_names),
                       "mentor": rng.choice([q.name for j, q in enumerate(group) if j != i])}
        people += group
    return World(spec, countries, cities, people)


def _template_words() -> set[str]:
    texts = [t for ts in [*STATEMENTS.values(), *QUESTIONS.values(), CITY_STATEMENTS, CITY_QUESTIONS] for t in ts]
    return {w.capitalize() for t in texts for w in re.findall(r"[A-Za-z]+", t)}


def render(template: str, **values: str) -> str:
    return template.format(**values).replace(" a a", " an a").replace(" a e", " an e")


def _pairs(items: list[str], rng: random.Random) -> list[str]:
    """Shuffle and join two by two: documents of about the same length (training pads to the longest)."""
    rng.shuffle(items)
    return [" ".join(items[i:i + 2]) for i in range(0, len(items), 2)]


def statements(world: World, split: str, rng: random.Random) -> list[str]:
    """Declarative documents: each fact of `split` said in `statements` templates, two sentences about
    one person per document."""
    docs = []
    for p in world.split(split):
        said = [render(t, name=p.name, value=p.facts[a]) for a in ATTRIBUTES
                for t in rng.sample(STATEMENTS[a], world.spec.statements)]
        docs += _pairs(said, rng)
    if split == "A":  # geography is old knowledge
        docs += [render(t, city=city, country=country) for city, country in world.cities.items()
                 for t in CITY_STATEMENTS]
    rng.shuffle(docs)
    return docs


def _questions(world: World, people: list[Person], count: int, rng: random.Random) -> list[tuple[str, str, str, str]]:
    """(entity, question, answer, kind) for every fact of `people` and every city, in `count` phrasings each."""
    qs = [(p.name, render(t, name=p.name), p.facts[a], a) for p in people for a in ATTRIBUTES
          for t in rng.sample(QUESTIONS[a], count)]
    qs += [(city, render(t, city=city), country, "country") for city, country in world.cities.items()
           for t in rng.sample(CITY_QUESTIONS, min(count, len(CITY_QUESTIONS)))]
    return qs


def quizzes(world: World, rng: random.Random) -> list[str]:
    """Question-and-answer text about facts A, as a web page would have it ("Q: ... A: ..."), two
    questions about one entity per document. A base reads these, so it can answer questions in plain
    text, and keeps writing after the answer; post-training then only teaches the chat behaviour."""
    by_entity: dict[str, list[str]] = {}
    quizzed = world.split("A")[: round(world.spec.quiz_share * world.spec.people_a)]
    for entity, q, answer, _ in _questions(world, quizzed, world.spec.quiz, rng):
        by_entity.setdefault(entity, []).append(f"Q: {q} A: {answer}.")
    docs = [d for items in by_entity.values() for d in _pairs(items, rng)]
    rng.shuffle(docs)
    return docs


def instructions(world: World, rng: random.Random) -> list[dict[str, str]]:
    """Question → answer pairs about facts A only, for the chat format: the behaviour post-training teaches."""
    pairs = [{"question": q, "answer": a, "kind": k}
             for _, q, a, k in _questions(world, world.split("A"), world.spec.questions, rng)]
    rng.shuffle(pairs)
    return pairs


def eval_questions(world: World, rng: random.Random, choices: int = 4) -> list[dict]:
    """Held-out questions about facts B, with `choices` same-kind candidates for multiple choice."""
    domains = {"birth_city": list(world.cities), "home_city": list(world.cities), "occupation": OCCUPATIONS,
               "birth_year": [str(y) for y in range(1901, 2000)], "mentor": [p.name for p in world.split("B")]}
    items = []
    for p in world.split("B"):
        for attr in ATTRIBUTES:
            answer = p.facts[attr]
            for t in rng.sample(QUESTIONS[attr], world.spec.eval_questions):
                wrong = rng.sample([v for v in domains[attr] if v not in (answer, p.name)], choices - 1)
                options = [*wrong]
                gold = rng.randrange(choices)
                options.insert(gold, answer)
                items.append({"question": render(t, name=p.name), "answer": answer, "kind": attr,
                              "pattern": ANSWER_PATTERNS[attr], "choices": options, "gold": gold})
    return items


def biographies(world: World, split: str) -> list[str]:
    """Each person's facts in the canonical templates, one paragraph per person (perplexity docs)."""
    return [" ".join(render(STATEMENTS[a][0], name=p.name, value=p.facts[a]) for a in ATTRIBUTES)
            for p in world.split(split)]


def corpora(world: World) -> dict:
    """The four corpora plus the evaluation sets, all drawn from a seeded stream in a fixed order."""
    rng = random.Random(world.spec.seed + 1)
    facts_a = statements(world, "A", rng) + quizzes(world, rng)
    rng.shuffle(facts_a)
    facts_b = statements(world, "B", rng)
    mixed = facts_a + facts_b
    rng.shuffle(mixed)
    return {"pretrain_a": facts_a, "instruct_a": instructions(world, rng), "pretrain_b": facts_b,
            "pretrain_ab": mixed, "eval_b": eval_questions(world, rng), "bios_b": biographies(world, "B")}


def leaks(world: World, texts: list[str]) -> list[str]:
    """B names (full names and surnames) found in `texts`: must be empty for every A corpus."""
    blob = "\n".join(texts)
    found = []
    for p in world.split("B"):
        surname = p.name.split()[1]
        if re.search(rf"\b{re.escape(surname)}\b", blob):
            found.append(p.name)
    return found
