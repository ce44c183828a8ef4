"""A fictional company, Brightwater Labs: documents that state facts about its staff (for
mid-training) and questions about those facts (for chat training and evaluation).

Every person has five facts: room, project, role, start year and manager. The documents state
every fact; the questions are split by fact, so an eval question asks about a fact that only the
documents taught, never a training question.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

from opd.tasks.base import Grade, GraderError, required_field, user_message
from opd.tasks.streams import stream

if TYPE_CHECKING:
    from opd.config import KnowledgeTaskConfig, TaskConfig

COMPANY = "Brightwater Labs"
ATTRIBUTES = ("room", "project", "role", "year", "manager")

FIRST_NAMES = [
    "Ada", "Bruno", "Celia", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas",
    "Kira", "Lars", "Maya", "Nikhil", "Olga", "Pablo", "Quinn", "Rosa", "Sami", "Tessa",
    "Umar", "Vera", "Wendell", "Xenia", "Yusuf", "Zora", "Anton", "Bianca", "Cyrus", "Dalia",
    "Emil", "Freya", "Gideon", "Hana", "Ivo", "Jada", "Kofi", "Lena", "Milo", "Noor",
]
LAST_NAMES = [
    "Varga", "Oduya", "Lindqvist", "Moreau", "Haddad", "Kowalski", "Tanaka", "Okafor", "Brennan", "Castillo",
    "Dubois", "Eriksen", "Fontaine", "Gallo", "Horvath", "Iversen", "Jovanovic", "Kaur", "Lehmann", "Marsh",
    "Novak", "Ortega", "Petrov", "Quist", "Rahman", "Sato", "Thorne", "Ueda", "Vasquez", "Whitlock",
    "Yilmaz", "Zeller", "Abara", "Bianchi", "Cole", "Delgado", "Esposito", "Falk", "Grady", "Holm",
]
PROJECTS = [f"Project {bird}" for bird in [
    "Heron", "Kestrel", "Osprey", "Plover", "Wren", "Starling", "Magpie", "Falcon", "Curlew", "Lapwing",
    "Swift", "Finch", "Oriole", "Puffin", "Egret", "Ibis", "Merlin", "Harrier", "Shrike", "Warbler",
    "Tern", "Gannet", "Avocet", "Bittern", "Crane", "Dunlin", "Eider", "Fulmar", "Godwit", "Hoopoe",
    "Jay", "Kite", "Linnet", "Nightjar", "Pipit", "Redstart", "Sandpiper", "Teal", "Whimbrel", "Rook",
]]
# No role is a whole phrase inside another ("engineer" vs "data engineer"): the grader would
# see the shorter one in the longer one.
ROLES = [
    "data engineer", "product designer", "technical writer", "security analyst", "backend developer",
    "frontend developer", "QA engineer", "support specialist", "research scientist", "sales manager",
    "office manager", "recruiter", "payroll officer", "legal counsel", "hardware technician",
    "network administrator", "database administrator", "design researcher", "marketing lead",
    "release manager", "solutions architect", "mobile developer", "firmware engineer", "supply planner",
    "finance controller", "community manager", "localization specialist", "field engineer",
    "procurement officer", "operations analyst",
]
ROOMS = [f"{wing}{number}" for wing in "ABCDEF" for number in range(1, 41)]
YEARS = [str(year) for year in range(2008, 2025)]


@dataclass(frozen=True)
class Person:
    name: str
    room: str
    project: str
    role: str
    year: str
    manager: str


def spread(rng: random.Random, pool: list[str], count: int) -> list[str]:
    """`count` values from `pool`, all different until the pool runs out."""
    values: list[str] = []
    while len(values) < count:
        values += rng.sample(pool, len(pool))
    return values[:count]


def build_company(cfg: KnowledgeTaskConfig) -> list[Person]:
    rng = random.Random(f"opd.tasks/knowledge/company/{cfg.seed}")
    full_names = [f"{first} {last}" for first, last in itertools.product(FIRST_NAMES, LAST_NAMES)]
    names = rng.sample(full_names, cfg.people)
    rooms = spread(rng, ROOMS, cfg.people)
    projects = spread(rng, PROJECTS, cfg.people)
    roles = spread(rng, ROLES, cfg.people)
    years = [rng.choice(YEARS) for _ in names]
    # A third of the staff lead a team; everyone (leads too) reports to a lead other than themselves.
    leads = names[:max(2, cfg.people // 3)]
    managers = [rng.choice([lead for lead in leads if lead != name]) for name in names]
    return [Person(*fields) for fields in zip(names, rooms, projects, roles, years, managers)]


def with_article(role: str) -> str:
    return ("an " if role[0].lower() in "aeiou" else "a ") + role


def fill(template: str, person: Person) -> str:
    return template.format(**asdict(person), a_role=with_article(person.role), company=COMPANY)


# ---------------------------------------------------------------------------------------------
# Documents: one kind per paraphrase. Each kind states all five facts of a person in its own
# words and gathers people into documents its own way, so a fact is stated `paraphrases` times,
# differently each time, in different documents. Every sentence names its person.


@dataclass(frozen=True)
class DocumentKind:
    title: str  # heading of each document; {key} is what its people share
    key: Callable[[Person, int], str]  # (person, position in the staff list) -> which document
    template: str  # the five facts of one person


DOCUMENT_KINDS = [
    DocumentKind("Staff directory: {key}.", lambda p, i: p.name,
                 "{name} is {a_role} at {company}, in room {room}. "
                 "{name} joined in {year}, works on {project} and reports to {manager}."),
    DocumentKind("{key}, project page.", lambda p, i: p.project,
                 "{name} contributes to {project} in the role of {role}. "
                 "{name} sits in room {room}, has been with {company} since {year} and is managed by {manager}."),
    DocumentKind("Notes from the weekly meeting of {key}'s team.", lambda p, i: p.manager,
                 "{name}, a member of {manager}'s team, gave the update for {project}. "
                 "{name} started at {company} in {year}, works as {a_role} and has a desk in room {room}."),
    DocumentKind("Onboarding notes for the people who joined in {key}.", lambda p, i: p.year,
                 "{name} came to {company} in {year}, hired as {a_role}. "
                 "On day one {name} was given room {room}, placed on {project} and introduced to {manager}, "
                 "{name}'s manager."),
    DocumentKind("Floor guide, wing {key}.", lambda p, i: p.room[0],
                 "Room {room} belongs to {name}, {a_role} who first arrived at {company} in {year}. "
                 "{name} spends most days on {project} and answers to {manager}."),
    DocumentKind("Staff newsletter, issue {key}: meet your colleagues.", lambda p, i: str(i // 4 + 1),
                 "Meet {name}, whose first day at {company} was in {year}. "
                 "{name}'s job title is {role}, and {name}'s boss is {manager}. "
                 "Find {name} in room {room}, busy with the {project} team."),
]


def documents(cfg: KnowledgeTaskConfig) -> list[str]:
    people = build_company(cfg)
    texts = []
    for kind in DOCUMENT_KINDS[:cfg.paraphrases]:
        groups: dict[str, list[str]] = {}  # insertion-ordered: documents follow the staff list
        for position, person in enumerate(people):
            groups.setdefault(kind.key(person, position), []).append(fill(kind.template, person))
        texts += [" ".join([kind.title.format(key=key), *sentences]) for key, sentences in groups.items()]
    if cfg.faq:
        texts += [faq_document(person) for person in people]
    # Interleave the kinds so that a stream of documents is not one kind after another.
    random.Random(f"opd.tasks/knowledge/documents/{cfg.seed}").shuffle(texts)
    return texts


# ---------------------------------------------------------------------------------------------
# Questions


QUESTIONS = {  # attribute -> (question wordings, reference answer)
    "room": (["Which room does {name} work in?", "In which room does {name} sit?"],
             "{name} works in room {room}."),
    "project": (["What project is {name} on?", "Which project does {name} work on?"],
                "{name} is on {project}."),
    "role": (["What is {name}'s role?", "What does {name} do at {company}?"],
             "{name} is {a_role}."),
    "year": (["When did {name} join {company}?", "In what year did {name} start at {company}?"],
             "{name} joined {company} in {year}."),
    "manager": (["Who is {name}'s manager?", "Who does {name} report to?"],
                "{name}'s manager is {manager}."),
}


def faq_document(person: Person) -> str:
    """An internal FAQ page: each fact as a question (the first wording) and its answer. Small
    models rarely turn declarative sentences into answers to questions; internal wikis often have
    such pages, and they make the knowledge reachable by a question."""
    lines = [f"Frequently asked questions about {person.name}."]
    for attribute, (wordings, reference) in QUESTIONS.items():
        lines.append(f"Q: {fill(wordings[0], person)} A: {fill(reference, person)}")
    return " ".join(lines)


def question_record(people: list[Person], person: Person, attribute: str, rng: random.Random) -> dict:
    wordings, reference = QUESTIONS[attribute]
    answer = getattr(person, attribute)
    # Other values of the attribute: naming one of them (or all of them) fails. The person asked
    # about is no distractor, though they may manage others: the answer names them too.
    others = {getattr(p, attribute) for p in people} - {answer, person.name}
    return {
        "messages": user_message(fill(rng.choice(wordings), person)),
        "task": "knowledge",
        "answer": answer,
        "completion": fill(reference, person),
        "person": person.name,
        "attribute": attribute,
        "distractors": sorted(others),
    }


def split_facts(task: TaskConfig, people: list[Person]) -> dict[str, list[tuple[Person, str]]]:
    """(person, attribute) facts, shuffled with the seeds and cut into eval and train."""
    facts = [(person, attribute) for person in people for attribute in ATTRIBUTES]
    random.Random(f"opd.tasks/knowledge/split/{task.knowledge.seed}/{task.seed}").shuffle(facts)
    held_out = min(len(facts) - 1, max(1, round(task.knowledge.eval_fraction * len(facts))))
    return {"eval": facts[:held_out], "train": facts[held_out:]}


def make_knowledge_records(task: TaskConfig, split: str, count: int) -> list[dict]:
    """Eval: one question per held-out fact, at most `count`. Train: `count` questions cycling
    through the training facts, in a fresh order (and wording) each pass."""
    people = build_company(task.knowledge)
    facts = split_facts(task, people)[split]
    rng = stream("knowledge", task.seed, split)
    if split == "eval":
        return [question_record(people, person, attribute, rng) for person, attribute in facts[:count]]
    records: list[dict] = []
    while len(records) < count:
        for person, attribute in rng.sample(facts, len(facts))[:count - len(records)]:
            records.append(question_record(people, person, attribute, rng))
    return records


# ---------------------------------------------------------------------------------------------
# Grading


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def mentions(text: str, phrase: str) -> bool:
    """Whether `phrase` occurs in `text` as whole words (case and spacing ignored): "B12" is
    not in "B123"."""
    return re.search(rf"(?<!\w){re.escape(normalise(phrase))}(?!\w)", normalise(text)) is not None


def grade_knowledge(record: dict, completion: str) -> Grade:
    answer = str(required_field(record, "answer", "knowledge"))
    distractors = required_field(record, "distractors", "knowledge")
    if not isinstance(distractors, list):
        raise GraderError(f"knowledge record `distractors` must be a list, found {type(distractors).__name__}")
    correct = mentions(completion, answer) and not any(mentions(completion, str(d)) for d in distractors)
    return Grade(score=1.0 if correct else 0.0)
