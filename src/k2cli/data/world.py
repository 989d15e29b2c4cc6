"""The synthetic world: people, organisations and cities, drawn from a seed; saved as `world.json`.

Physics of Language Models 3.1 (bioS) gives every individual six attributes — birth date, birth
city, university, major, employer, employer city. Later stages build tool environments (directory
look-ups, calendars, a bank ledger, orders) and RL tasks on the same world, so it is a small
relational database rather than a bag of strings:

    cities         id, name, country, calling code, population, UTC offset (hours)
    organisations  id, name, kind (company | university), industry, headquarters and office cities,
                   founded, e-mail domain, headcount (people of this world who work or studied there)
    people         id, name parts, gender, the six bioS attributes (as ids where they are entities),
                   e-mail, phone, bank account id and balance, monthly salary

Everything is deterministic in (seed, size). Person i is drawn from its own random stream
`Random(f"{seed}:person:{i}")`, so a larger world extends a smaller one with the same seed: the
first N people (ids, names, attributes) are the same whatever the size. Ids are stable strings
("P000012", "O07", "C03") that never depend on iteration order elsewhere.

The vocabulary stays modest on purpose (tens of cities, universities, majors and companies; a few
hundred name parts), so a 2048-token BPE covers it and a tiny model can learn it.
"""

from __future__ import annotations

import calendar
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from k2cli.errors import K2Error

WORLD_FILE = "world.json"
WORLD_FORMAT = 1

# The six bioS attributes, in the order PLM 3.1 writes them.
ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "employer_city")

# ----------------------------------------------------------------------------- vocabulary

# (name, country, calling code, population, UTC offset in hours, standard time)
CITIES = [
    ("Oslo", "Norway", "+47", 709_000, 1), ("Lima", "Peru", "+51", 10_004_000, -5),
    ("Kyoto", "Japan", "+81", 1_464_000, 9), ("Porto", "Portugal", "+351", 232_000, 0),
    ("Riga", "Latvia", "+371", 605_000, 2), ("Sofia", "Bulgaria", "+359", 1_241_000, 2),
    ("Lyon", "France", "+33", 522_000, 1), ("Denver", "United States", "+1", 716_000, -7),
    ("Austin", "United States", "+1", 975_000, -6), ("Boston", "United States", "+1", 654_000, -5),
    ("Seattle", "United States", "+1", 749_000, -8), ("Toronto", "Canada", "+1", 2_794_000, -5),
    ("Vancouver", "Canada", "+1", 662_000, -8), ("Dublin", "Ireland", "+353", 592_000, 0),
    ("Madrid", "Spain", "+34", 3_332_000, 1), ("Munich", "Germany", "+49", 1_512_000, 1),
    ("Vienna", "Austria", "+43", 1_983_000, 1), ("Prague", "Czechia", "+420", 1_357_000, 1),
    ("Krakow", "Poland", "+48", 800_000, 1), ("Helsinki", "Finland", "+358", 664_000, 2),
    ("Athens", "Greece", "+30", 643_000, 2), ("Cairo", "Egypt", "+20", 10_100_000, 2),
    ("Nairobi", "Kenya", "+254", 4_397_000, 3), ("Mumbai", "India", "+91", 12_442_000, 5.5),
    ("Singapore", "Singapore", "+65", 5_917_000, 8), ("Seoul", "South Korea", "+82", 9_411_000, 9),
    ("Sydney", "Australia", "+61", 5_312_000, 10), ("Adelaide", "Australia", "+61", 1_387_000, 9.5),
    ("Auckland", "New Zealand", "+64", 1_694_000, 12), ("Santiago", "Chile", "+56", 6_310_000, -4),
    ("Bogota", "Colombia", "+57", 7_901_000, -5), ("Montreal", "Canada", "+1", 1_780_000, -5),
]

UNIVERSITIES = [
    "Lakeside University", "Northfield Institute of Technology", "Riverbend University", "Eastbrook College",
    "Westmoor University", "Highgate Polytechnic", "Silverlake University", "Kingsbridge University",
    "Ashford College", "Redcliff University", "Stonehaven Institute", "Greenvale University",
    "Oakridge University", "Pinecrest College", "Brookfield University", "Fairhaven Institute of Science",
    "Marlow University", "Thornbury College", "Clearwater University", "Elmstead Polytechnic",
]

# (name, industry, e-mail domain)
COMPANIES = [
    ("Northwind Analytics", "software", "northwind.example"), ("Bluepeak Labs", "biotechnology", "bluepeak.example"),
    ("Crescent Foods", "food", "crescentfoods.example"), ("Ironbridge Logistics", "logistics", "ironbridge.example"),
    ("Silverline Bank", "finance", "silverline.example"), ("Harbor Health", "healthcare", "harborhealth.example"),
    ("Greenleaf Energy", "energy", "greenleaf.example"), ("Stonegate Construction", "construction", "stonegate.example"),
    ("Brightwave Media", "media", "brightwave.example"), ("Redwood Robotics", "robotics", "redwood.example"),
    ("Solace Insurance", "insurance", "solace.example"), ("Atlas Aerospace", "aerospace", "atlasaero.example"),
    ("Cobalt Mining", "mining", "cobaltmining.example"), ("Maple Retail", "retail", "mapleretail.example"),
    ("Orbit Telecom", "telecommunications", "orbittelecom.example"), ("Summit Pharmaceuticals", "pharmaceuticals", "summitpharma.example"),
    ("Evergreen Forestry", "forestry", "evergreen.example"), ("Pioneer Motors", "automotive", "pioneermotors.example"),
    ("Lumen Optics", "optics", "lumenoptics.example"), ("Nimbus Cloud", "software", "nimbuscloud.example"),
    ("Tidal Shipping", "shipping", "tidalshipping.example"), ("Granite Capital", "finance", "granitecapital.example"),
    ("Juniper Games", "entertainment", "junipergames.example"), ("Falcon Airlines", "aviation", "falconair.example"),
    ("Horizon Hotels", "hospitality", "horizonhotels.example"), ("Copperfield Textiles", "textiles", "copperfield.example"),
    ("Arctic Seafood", "food", "arcticseafood.example"), ("Vertex Semiconductors", "semiconductors", "vertexsemi.example"),
    ("Willow Publishing", "publishing", "willowpub.example"), ("Sterling Consulting", "consulting", "sterling.example"),
]

MAJORS = [
    "Biology", "Computer Science", "Economics", "History", "Mathematics", "Physics", "Chemistry", "Philosophy",
    "Architecture", "Music", "Nursing", "Law", "Psychology", "Sociology", "Linguistics", "Geography",
    "Mechanical Engineering", "Civil Engineering", "Electrical Engineering", "Graphic Design", "Journalism",
    "Statistics", "Astronomy", "Marine Biology", "Political Science", "Accounting",
]

FIRST_NAMES = {
    "female": ["Anna", "Beatrice", "Clara", "Daria", "Elena", "Fiona", "Greta", "Hana", "Iris", "Julia", "Karin",
               "Lena", "Maya", "Nora", "Olga", "Paula", "Rosa", "Sara", "Tessa", "Ursula", "Vera", "Wanda", "Yara",
               "Zoe", "Alma", "Bianca", "Celia", "Diana", "Edith", "Freya", "Gemma", "Helga", "Ines", "Joanna",
               "Lucia", "Mirela", "Nadia", "Petra", "Sonia", "Talia"],
    "male": ["Aaron", "Boris", "Carlos", "Daniel", "Emil", "Felix", "Gustav", "Hugo", "Ivan", "Jonas", "Karl",
             "Leon", "Marco", "Nikolai", "Oscar", "Pablo", "Rafael", "Stefan", "Tomas", "Viktor", "Walter", "Xavier",
             "Yusuf", "Anton", "Bruno", "Caspar", "Dmitri", "Erik", "Fabian", "Georg", "Henrik", "Igor", "Jakob",
             "Lars", "Matteo", "Nils", "Otto", "Pavel", "Sven", "Theo"],
}
MIDDLE_NAMES = ["Avery", "Blake", "Carter", "Dale", "Ellis", "Finley", "Gray", "Harper", "Indigo", "Jordan",
                "Kendall", "Lane", "Morgan", "Noel", "Oakley", "Parker", "Quinn", "Reese", "Sage", "Taylor",
                "Vale", "Winter", "Arden", "Brook", "Camden", "Devon", "Emery", "Frost", "Hollis", "Jules",
                "Kit", "Linden", "Marlow", "North", "Perry", "Rowan", "Shay", "Tatum", "West", "Wren"]
LAST_NAMES = ["Berg", "Costa", "Dahl", "Evans", "Fischer", "Garcia", "Hansen", "Ivanova", "Jensen", "Kowalski",
              "Larsen", "Moreau", "Novak", "Olsen", "Petrov", "Quintero", "Rossi", "Schmidt", "Tanaka", "Ueda",
              "Varga", "Weber", "Young", "Zeller", "Andersen", "Bauer", "Castillo", "Dubois", "Eriksen", "Ferrari",
              "Gallo", "Horvat", "Ibsen", "Jovanovic", "Keller", "Lindqvist", "Meyer", "Nakamura", "Ortega",
              "Pereira", "Romano", "Silva", "Torres", "Ulrich", "Vogel", "Wagner", "Yilmaz", "Zimmermann",
              "Almeida", "Brandt", "Conti", "Dimitrov", "Esposito", "Fontaine", "Gruber", "Haas", "Iversen",
              "Jansen", "Koch", "Lorenz", "Marino", "Nieminen", "Ostrowski", "Popescu", "Richter", "Sorensen",
              "Takahashi", "Urban", "Vidal", "Winkler", "Yamada", "Zorn", "Acosta", "Becker", "Cruz", "Dvorak",
              "Engel", "Falk", "Greco", "Hoffmann"]

PRONOUNS = {"female": {"subject": "she", "object": "her", "possessive": "her"},
            "male": {"subject": "he", "object": "him", "possessive": "his"}}

BIRTH_YEARS = (1950, 2003)


def max_size() -> int:
    """Distinct full names available; we stop well below it so drawing unique names stays fast."""
    firsts = sum(len(v) for v in FIRST_NAMES.values())
    return firsts * len(MIDDLE_NAMES) * len(LAST_NAMES) // 2


# ----------------------------------------------------------------------------- records


@dataclass
class City:
    id: str
    name: str
    country: str
    calling_code: str
    population: int
    utc_offset: float  # hours east of UTC, standard time


@dataclass
class Organisation:
    id: str
    name: str
    kind: str  # "company" | "university"
    industry: str  # "education" for universities
    hq_city_id: str
    office_city_ids: list[str]  # headquarters first; people of a company work in one of these
    founded: int
    domain: str  # e-mail domain of its people
    headcount: int = 0  # people of this world employed there (companies) or who studied there (universities)


@dataclass
class Person:
    id: str
    first_name: str
    middle_name: str
    last_name: str
    gender: str  # "female" | "male": chooses the pronouns of the biographies
    birth_date: str  # ISO "1996-10-02"
    birth_city_id: str
    university_id: str
    major: str
    employer_id: str
    employer_city_id: str
    email: str
    phone: str
    account_id: str
    account_balance: int  # whole currency units
    monthly_salary: int

    @property
    def name(self) -> str:
        return f"{self.first_name} {self.middle_name} {self.last_name}"

    @property
    def birth_year(self) -> int:
        return int(self.birth_date[:4])


@dataclass
class World:
    seed: int
    cities: list[City]
    organisations: list[Organisation]
    people: list[Person]
    majors: list[str] = field(default_factory=lambda: list(MAJORS))
    _index: dict = field(default=None, init=False, repr=False, compare=False)

    # -- look-ups by id (an index built on first use)
    def _lookup(self, kind: str, id_: str):
        if self._index is None:
            self._index = {"city": {c.id: c for c in self.cities}, "org": {o.id: o for o in self.organisations},
                           "person": {p.id: p for p in self.people}}
        try:
            return self._index[kind][id_]
        except KeyError:
            raise K2Error(f"the world has no {kind} with id '{id_}'", "check the id against world.json") from None

    def city(self, id_: str) -> City:
        return self._lookup("city", id_)

    def org(self, id_: str) -> Organisation:
        return self._lookup("org", id_)

    def person(self, id_: str) -> Person:
        return self._lookup("person", id_)

    @property
    def companies(self) -> list[Organisation]:
        return [o for o in self.organisations if o.kind == "company"]

    @property
    def universities(self) -> list[Organisation]:
        return [o for o in self.organisations if o.kind == "university"]

    def attributes(self, p: Person) -> dict[str, str]:
        """The six bioS attributes of a person as the text of the biographies writes them."""
        return {
            "birth_date": format_date(p.birth_date),
            "birth_city": self.city(p.birth_city_id).name,
            "university": self.org(p.university_id).name,
            "major": p.major,
            "employer": self.org(p.employer_id).name,
            "employer_city": self.city(p.employer_city_id).name,
        }

    def lexicon(self) -> set[str]:
        """Every entity name of the world (people, organisations, cities, majors): what fidelity checks look for."""
        return ({p.name for p in self.people} | {o.name for o in self.organisations} | {c.name for c in self.cities}
                | set(self.majors))

    def to_dict(self) -> dict:
        return {
            "format": WORLD_FORMAT,
            "seed": self.seed,
            "size": len(self.people),
            "cities": [asdict(c) for c in self.cities],
            "organisations": [asdict(o) for o in self.organisations],
            "majors": list(self.majors),
            "people": [asdict(p) | {"name": p.name} for p in self.people],
        }


def format_date(iso: str) -> str:
    """'1996-10-02' -> 'October 2, 1996' (the one date format of the biographies and QA answers)."""
    y, m, d = (int(x) for x in iso.split("-"))
    return f"{calendar.month_name[m]} {d}, {y}"


# ----------------------------------------------------------------------------- generation


def _rng(seed: int, *parts) -> random.Random:
    """An independent, reproducible stream per purpose (str seeds hash with sha512: stable across runs)."""
    return random.Random(":".join(str(p) for p in (seed, *parts)))


def _cities() -> list[City]:
    return [City(f"C{i:02d}", name, country, code, pop, off) for i, (name, country, code, pop, off) in enumerate(CITIES)]


def _organisations(seed: int, cities: list[City]) -> list[Organisation]:
    """Companies get 1-3 offices (headquarters first); universities sit in one city."""
    rng = _rng(seed, "orgs")
    orgs = []
    for i, (name, industry, domain) in enumerate(COMPANIES):
        offices = rng.sample(cities, rng.randint(1, 3))
        orgs.append(Organisation(f"O{i:02d}", name, "company", industry, offices[0].id, [c.id for c in offices],
                                 rng.randint(1900, 2015), domain))
    for j, name in enumerate(UNIVERSITIES):
        city = rng.choice(cities)
        domain = name.lower().replace(" of ", " ").replace(" ", "") + ".example"
        orgs.append(Organisation(f"O{len(COMPANIES) + j:02d}", name, "university", "education", city.id, [city.id],
                                 rng.randint(1800, 1990), domain))
    return orgs


def _birth_date(rng: random.Random) -> str:
    y = rng.randint(*BIRTH_YEARS)
    m = rng.randint(1, 12)
    d = rng.randint(1, calendar.monthrange(y, m)[1])
    return f"{y:04d}-{m:02d}-{d:02d}"


def _person(i: int, seed: int, cities, companies, universities, taken: set[str]) -> Person:
    rng = _rng(seed, "person", i)
    gender = rng.choice(("female", "male"))
    while True:  # unique full names keep every QA question unambiguous
        first, middle, last = rng.choice(FIRST_NAMES[gender]), rng.choice(MIDDLE_NAMES), rng.choice(LAST_NAMES)
        if f"{first} {middle} {last}" not in taken:
            break
    employer = rng.choice(companies)
    work_city = rng.choice(employer.office_city_ids)
    city = cities[int(work_city[1:])]  # city ids are their index: "C07" -> cities[7]
    return Person(
        id=f"P{i:06d}",
        first_name=first,
        middle_name=middle,
        last_name=last,
        gender=gender,
        birth_date=_birth_date(rng),
        birth_city_id=rng.choice(cities).id,
        university_id=rng.choice(universities).id,
        major=rng.choice(MAJORS),
        employer_id=employer.id,
        employer_city_id=work_city,
        email=f"{first}.{middle[0]}.{last}@{employer.domain}".lower(),
        phone=f"{city.calling_code} {rng.randint(100, 999)} {rng.randint(1000, 9999)} {rng.randint(100, 999)}",
        account_id=f"ACC{i:06d}",
        account_balance=rng.randint(20, 2000) * 10,
        monthly_salary=rng.randint(150, 900) * 10,
    )


def build_world(size: int, seed: int = 0) -> World:
    """A world of `size` people (plus the fixed pools of cities and organisations) from `seed`."""
    if size < 2:
        raise K2Error(f"world size {size} is too small", "use at least 2 people (QA holds out half of them)")
    if size > max_size():
        raise K2Error(f"world size {size} is above the {max_size()} distinct names this world can draw",
                      f"use a size of at most {max_size()}")
    cities = _cities()
    orgs = _organisations(seed, cities)
    companies = [o for o in orgs if o.kind == "company"]
    universities = [o for o in orgs if o.kind == "university"]
    people, taken = [], set()
    for i in range(size):
        p = _person(i, seed, cities, companies, universities, taken)
        taken.add(p.name)
        people.append(p)
    counts: dict[str, int] = {}
    for p in people:
        for oid in (p.employer_id, p.university_id):
            counts[oid] = counts.get(oid, 0) + 1
    for o in orgs:
        o.headcount = counts.get(o.id, 0)
    return World(seed=seed, cities=cities, organisations=orgs, people=people)


# ----------------------------------------------------------------------------- the database file


def save_world(world: World, path: str | Path) -> None:
    """Write world.json (stable key order and formatting: the same world gives the same bytes)."""
    Path(path).write_text(json.dumps(world.to_dict(), indent=1, ensure_ascii=False) + "\n")


def world_from_dict(data: dict) -> World:
    if data.get("format") != WORLD_FORMAT:
        raise K2Error(f"unknown world.json format {data.get('format')!r}", "re-create the dataset with 'k2 data synth'")
    people = []
    for p in data["people"]:
        p = {k: v for k, v in p.items() if k != "name"}  # derived from the name parts
        people.append(Person(**p))
    return World(
        seed=data["seed"],
        cities=[City(**c) for c in data["cities"]],
        organisations=[Organisation(**o) for o in data["organisations"]],
        people=people,
        majors=list(data.get("majors", MAJORS)),
    )


def load_world(ref: str | Path) -> World:
    """The world of a dataset artifact (ref or path), or of a world.json file."""
    path = Path(ref)
    if not (path.is_file() and path.suffix == ".json"):
        from k2cli.artifacts import open_artifact

        art = open_artifact(ref, kind="dataset")
        path = art.file(WORLD_FILE)
        if not path.is_file():
            raise K2Error(f"dataset {art.id} has no {WORLD_FILE}", "use a dataset made by 'k2 data synth' (or 'k2 rephrase' of one)")
    try:
        return world_from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise K2Error(f"corrupt {path}: {e}", "re-create the dataset with 'k2 data synth'")
