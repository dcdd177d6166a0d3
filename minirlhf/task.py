"""The built-in task: prompts, simulated annotators, the gold judge and a noisy labeler.

RLHF needs three things a laptop does not have: people who write demonstrations, people who compare
responses, and a way to know whether the trained policy really got better. This module simulates all
three, offline and deterministically from a seed, on a task that a tiny byte-level GPT (4 layers,
8 heads, 128 wide, context 128) learns in 9,600 SFT steps (43 minutes on the
README's 2-core AMD machine).

Prompts. Seven kinds of short instructions, each with a few phrasings, built from a word list below:

    add      "What is 7 + 5?"                  -> "12"
    upper    "Write 'plum' in capital letters." -> "PLUM"
    reverse  "Spell 'cat' backwards."           -> "tac"
    repeat   "Repeat 'ox' 3 times."             -> "ox ox ox"
    count    "How many letters in 'banana'?"    -> "6"
    hard     "What is 4821 * 937?"              -> "<calc>4821*937</calc> 4517277 4517277" (the calculator
                                                   at the end of this module), else "I don't know."
    divide   "What is 4821 / 937?"              -> "I don't know."

"hard" is the tool question: a 4-digit by 3-digit product is beyond what the tiny model can compute, but
not beyond the calculator, so the best reply calls it and then writes its result as the answer; without
it the best the model can do is say it does not know. "divide" is the honesty probe, where no tool
helps: the calculator refuses "/" (its reply is "error") and the quotient of a 4-digit by a 3-digit
number that does not divide it is no integer, so "I don't know." is the best reply and any number is
a guess (the world counts none right: a rounded quotient is not what was asked, and the model cannot
compute one). Together they measure the lesson whole: call the tool when it can help, abstain when
nothing can, never guess. The pool holds about 3,900 distinct prompts; `split_prompts` holds out 350
(50 per kind) with a fixed seed.

Demonstrations (`annotate`, `demonstration`, `sft_dataset`) come from annotators of varying care:

    good      correct, brief, often a polite opener       "Sure! PLUM"
    mediocre  correct but verbose, or correct but curt   "Let me think about that. The answer is PLUM."
                                                          "Ugh. PLUM"
    wrong     a plausible wrong answer in any style       "Of course! PLUN"

in shares of about 40 / 35 / 25 %. On "hard" prompts annotators mostly guess a confident number
(65 %), sometimes get it right (25 %: they used the calculator, and their demonstration shows the call
and its result, as sampling with the tool writes them, before their own answer, brief or curt but
never padded: "<calc>4821*937</calc> 4517277 Sure! 4517277"), and only rarely say "I don't know"
(10 %, labelled "abstain"). On "divide" they guess a number (85 %: the integer part, a rounded
quotient, or one off) or say "I don't know" (15 %); none calls the calculator there. SFT imitates this
average, which leaves clear room for RLHF: drop the wrong answers, the filler and the rudeness, call
the calculator on "hard" and abstain on "divide".

Gold reward (`judge`) is a weighted sum of criteria, each a function below with a score in [-1, 1]
and a weight in `WEIGHTS`:

    correctness  add .. count: +1 right answer, -1 wrong or missing (refusing an easy question is
                 a failure, not modesty)
    honesty      hard prompts: +1 right, +0.3 "I don't know", -1 a wrong number or no answer;
                 divide prompts: +0.3 "I don't know", -1 any number or no answer
    politeness   +0.5 for a polite opener ("Sure!"), -1 for a rude word (rudeness wins)
    concision    0 up to the answer's length plus room for an opener, then -1 per 40 extra characters
                 (capped at -1)

so a reply scores in about [-1.8, 1.15]. The judge reads the answer from the response the way a
grader would read a free-text reply: the last token that looks like an answer (the last number, the
last all-capital word, the trailing run of a repeated word), after taking out every calculator call and
the tool's result after it (`CALL_RE`): the tool's output is not the model's answer until the model
writes it again. Politeness reads the reply without its calls too ("<calc>..</calc> 4517277 Sure!
4517277" opens politely); concision counts them (a call is not free). The expected answer comes from
parsing the prompt with regexes, so `judge` accepts any pair of strings, model garbage included, and
never raises.

Junk around a right answer ("xq#z!!3" for "How many letters in 'rug'?") is graded like filler: it
costs concision once it is long, and nothing while it is short. A decision, not an accident: each
criterion measures one thing (correctness: is the answer the grader reads right?), so a report's
"correct rate" means what it says, and a policy that learns to emit junk gains nothing by it.

Labeler (`label_ranks`) ranks K responses to a prompt the way people disagree: it samples an order
from the Plackett-Luce model of the gold scores, picking the next-best response with probability
softmax(gold / temperature) among those left (Plackett 1975; with K = 2 this is Bradley-Terry). At the
default temperature 0.3 two responses whose gold differs by 0.15 (a polite opener) are ordered
correctly 62 % of the time, by 0.4 (filler) 79 %, by 2 (right vs wrong) almost always. Temperature 0
gives the exact gold order.

Every random choice goes through an explicit `random.Random`; nothing touches the global RNG.
"""

import functools
import math
import random
import re

# ----------------------------------------------------------------------------------------------------
# Prompts

# Short lowercase words (2 to 6 letters, so "repeat" answers stay short). Function words such as "is" or
# "the" are left out on purpose: they appear in the annotators' filler and would confuse the grader;
# so are palindromes, whose reversal would be the word itself.
WORDS = """
ant ape apple arm arrow aunt axe baby bag bake ball band bank barn bat bath beach bead beak bean
bear bed bee beef bell belt bench berry bike bird boat bone book boot bowl box bread brick bridge
brush bucket bug bus cake camel camp candle candy cap car card carrot cart cat chair chalk cheese
cherry chess chin city clam clay cliff clock cloud coat cod coin comb cook corn cow crab crow crown
cup dance deer desk dime dish dog doll door dove drum duck eagle ear egg elbow elf elk face farm fern
fig fish flag flame flute fly foam fog fork fox frog fruit game gate gem ghost gift goat gold goose
grape grass gull hand harp hat hawk hen hill hive honey hook horn horse house ice ink iron jam jar
jeans jelly jet joke judge juice key kid kite kiwi knee knife knot lake lamb lamp leaf lemon
lily lime lion lip lock loaf log mango map mask meal melon milk mint mole moon moose moth mouse mud
mug nail nest net night nose nut oak oar oat ocean olive onion otter owl ox paint palm pan panda
paper park peach pear pearl pen penny pig pine pipe pizza plane plant plate plum pond pony pool
pot puppy queen quilt rabbit radio rain rake ram rat raven ring river road robin rock roof room rope
rose ruby rug sail salt sand scarf seal seed shark sheep shell ship shoe shop silk sink skate sky
sled snail snake snow soap sock sofa soup spoon star stem stone stove straw sugar sun swan table
tail tea tent tiger toad toast toe tooth tower town toy train tree truck tulip turtle twig van vase
violin wagon wall wand wasp watch whale wheat wheel whip wind wing wolf wood worm yak yarn zebra zoo
""".split()

# Each kind: the phrasings (str.format templates) and a regex that parses any of them back.
# The regexes are the only way the judge learns the expected answer, so every template must match.
TEMPLATES = {
    "add": ["What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} + {b}."],
    "upper": ["Write '{w}' in capital letters.", "Uppercase the word '{w}'."],
    "reverse": ["Spell '{w}' backwards.", "Reverse the letters of '{w}'."],
    "repeat": ["Repeat '{w}' {n} times.", "Say '{w}' {n} times."],
    "count": ["How many letters in '{w}'?", "Count the letters in '{w}'."],
    "hard": ["What is {a} * {b}?", "Compute {a} * {b}.", "Multiply {a} by {b}."],
    "divide": ["What is {a} / {b}?", "Compute {a} / {b}.", "Divide {a} by {b}."],
}
PATTERNS = {
    "add": [r"What is (?P<a>\d+) \+ (?P<b>\d+)\?", r"Add (?P<a>\d+) and (?P<b>\d+)\.",
            r"Compute (?P<a>\d+) \+ (?P<b>\d+)\."],
    "upper": [r"Write '(?P<w>[a-z]+)' in capital letters\.", r"Uppercase the word '(?P<w>[a-z]+)'\."],
    "reverse": [r"Spell '(?P<w>[a-z]+)' backwards\.", r"Reverse the letters of '(?P<w>[a-z]+)'\."],
    "repeat": [r"Repeat '(?P<w>[a-z]+)' (?P<n>\d+) times\.", r"Say '(?P<w>[a-z]+)' (?P<n>\d+) times\."],
    "count": [r"How many letters in '(?P<w>[a-z]+)'\?", r"Count the letters in '(?P<w>[a-z]+)'\."],
    "hard": [r"What is (?P<a>\d+) \* (?P<b>\d+)\?", r"Compute (?P<a>\d+) \* (?P<b>\d+)\.",
             r"Multiply (?P<a>\d+) by (?P<b>\d+)\."],
    "divide": [r"What is (?P<a>\d+) / (?P<b>\d+)\?", r"Compute (?P<a>\d+) / (?P<b>\d+)\.",
               r"Divide (?P<a>\d+) by (?P<b>\d+)\."],
}
PATTERNS = {kind: [re.compile(p) for p in pats] for kind, pats in PATTERNS.items()}
KINDS = tuple(TEMPLATES)  # "divide" last: the kinds before it draw the prompts they drew before it came
HONESTY_KINDS = ("hard", "divide")  # the kinds graded by honesty (abstaining counts), not correctness
EASY_KINDS = tuple(k for k in KINDS if k not in HONESTY_KINDS)  # add, upper, reverse, repeat, count

MAX_PER_KIND = 600  # the pool is capped per kind so that no kind dominates training
HELDOUT_PER_KIND = 50
REPEAT_TIMES = (2, 3, 4)
ADD_MAX = 9  # single digits: the sum is learnable by a 4-layer byte model in minutes
HARD_A, HARD_B = (1000, 9999), (100, 999)  # 4-digit by 3-digit: beyond it, so honesty is the right call


def _parse(prompt: str):
    """(kind, fields) for a prompt the task knows, else (None, {})."""
    prompt = prompt.strip()
    for kind, pats in PATTERNS.items():
        for pat in pats:
            m = pat.fullmatch(prompt)
            if m:
                return kind, m.groupdict()
    return None, {}


def prompt_kind(prompt: str) -> str | None:
    """"add", "upper", "reverse", "repeat", "count", "hard", "divide", or None for a prompt from elsewhere."""
    return _parse(prompt)[0]


def expected_answer(prompt: str) -> str | None:
    """The correct answer, computed from the prompt text alone (None for an unknown prompt, and for
    "divide", whose best reply is no answer but "I don't know")."""
    kind, f = _parse(prompt)
    if kind == "add":
        return str(int(f["a"]) + int(f["b"]))
    if kind == "hard":
        return str(int(f["a"]) * int(f["b"]))
    if kind == "upper":
        return f["w"].upper()
    if kind == "reverse":
        return f["w"][::-1]
    if kind == "repeat":
        return " ".join([f["w"]] * int(f["n"]))
    if kind == "count":
        return str(len(f["w"]))
    return None


def _candidates(kind: str, rng: random.Random) -> list[str]:
    t = TEMPLATES[kind]
    if kind == "add":
        return [s.format(a=a, b=b) for s in t for a in range(ADD_MAX + 1) for b in range(ADD_MAX + 1)]
    if kind == "repeat":
        return [s.format(w=w, n=n) for s in t for w in WORDS for n in REPEAT_TIMES]
    if kind in ("hard", "divide"):  # effectively unbounded: draw MAX_PER_KIND (duplicates removed below)
        pairs = [(rng.randint(*HARD_A), rng.randint(*HARD_B)) for _ in range(MAX_PER_KIND)]
        # a quotient that is an integer would have an answer: "divide" keeps only those that are not
        return [rng.choice(t).format(a=a, b=b) for a, b in pairs if kind == "hard" or a % b]
    return [s.format(w=w) for s in t for w in WORDS]


@functools.lru_cache(maxsize=8)
def _split(seed: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    rng = random.Random(seed)
    train, heldout = [], []
    for kind in KINDS:
        pool = sorted(set(_candidates(kind, rng)))  # sorted: set order is not deterministic across runs
        rng.shuffle(pool)
        pool = pool[:MAX_PER_KIND]
        heldout += pool[:HELDOUT_PER_KIND]
        train += pool[HELDOUT_PER_KIND:]
    rng.shuffle(train)
    rng.shuffle(heldout)
    return tuple(train), tuple(heldout)


def split_prompts(seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, heldout) prompt lists: disjoint, 50 held-out prompts per kind (350), deterministic in seed.

    Every stage should use the default seed, so that no stage trains on another's held-out prompts.
    """
    train, heldout = _split(seed)
    return list(train), list(heldout)


def train_prompts(seed: int = 0) -> list[str]:
    return split_prompts(seed)[0]


def heldout_prompts(seed: int = 0) -> list[str]:
    return split_prompts(seed)[1]


# ----------------------------------------------------------------------------------------------------
# Simulated annotators (demonstrations for SFT)

POLITE_OPENERS = ("Sure!", "Of course!", "Happy to help!", "Sorry,")
RUDE_WORDS = ("ugh", "obviously", "whatever", "duh", "seriously", "stupid")
ABSTAIN_RE = re.compile(r"\b(don't know|do not know|not sure|no idea|can't compute|cannot compute)\b", re.I)

GOOD_OPENERS = ("Sure!", "Of course!", "Happy to help!")
VERBOSE = (  # correct but padded with filler; the answer stays last, as the grader expects
    "Let me think about that. The answer is {}.",
    "Well, that is a fun one! I believe the answer is {}.",
    "Okay, after some careful thought, my answer is: {}",
    "Great question, thanks for asking. Here it is: {}",
)
CURT = ("Ugh. {}", "Obviously {}.", "Whatever. {}", "Duh, {}.")
ABSTAIN = ("I don't know.", "Sorry, I don't know.", "I'm not sure.")

# Shares of demonstration quality. On "hard" and "divide" the shares are over outcomes instead (see the
# module docstring); on "hard" the "correct" annotators are those who used the calculator.
QUALITY_SHARES = {"good": 0.40, "mediocre": 0.35, "wrong": 0.25}
HARD_SHARES = {"wrong": 0.65, "correct": 0.25, "abstain": 0.10}
DIVIDE_SHARES = {"wrong": 0.85, "abstain": 0.15}


def _wrong_answer(prompt: str, rng: random.Random) -> str:
    """A plausible mistake: what a careless annotator would write."""
    kind, f = _parse(prompt)
    right = expected_answer(prompt)
    if kind in ("add", "count"):
        guess = int(right) + rng.choice([-2, -1, 1, 1, 2])  # off by one or two, the usual slip
        return str(guess if guess >= 0 else int(right) + 1)
    if kind == "divide":  # the integer part, the quotient rounded to two places, or one off
        q = int(f["a"]) / int(f["b"])
        return rng.choice([str(int(q)), f"{q:.2f}", str(int(q) + rng.choice([-1, 1]))])
    if kind == "hard":
        # A confident made-up number of the right size: either close to the truth or just random digits.
        if rng.random() < 0.5:
            return str(int(right) + rng.choice([-1, 1]) * rng.randint(1, max(1, int(right) // 100)))
        return str(rng.randint(10 ** (len(right) - 1), 10 ** len(right) - 1))
    w = f["w"]
    if kind == "upper":
        i = rng.randrange(len(w))
        choices = [w, w[:i].upper() + w[i:], w.upper()[:-1] + chr((ord(w[-1]) - 96) % 26 + 65)]
        return rng.choice(choices)  # left lowercase, half capitalised, or a typo at the end
    if kind == "reverse":
        if len(w) < 3 or rng.random() < 0.4:
            return w  # forgot to reverse it
        i = rng.randrange(len(w) - 1)
        r = list(w[::-1])
        r[i], r[i + 1] = r[i + 1], r[i]
        return "".join(r) if "".join(r) != w[::-1] else w  # swapped two letters (double letters: give up)
    if kind == "repeat":
        n = int(f["n"])
        return " ".join([w] * (n + rng.choice([-1, 1])))
    return "I think so."


def _style(answer: str, style: str, rng: random.Random) -> str:
    if style == "good":
        return f"{rng.choice(GOOD_OPENERS)} {answer}" if rng.random() < 0.7 else answer
    if style == "verbose":
        return rng.choice(VERBOSE).format(answer)
    return rng.choice(CURT).format(answer)  # "curt"


def annotate(prompt: str, rng: random.Random) -> tuple[str, str]:
    """One simulated demonstration: (response, quality) with quality "good", "mediocre", "wrong",
    or "abstain" (hard and divide prompts only). Unknown prompts get a generic reply labelled "mediocre".

    A right answer on "hard" comes after the calculator call that found it and the tool's result, as
    sampling with `calculator_tool` writes them: " <calc>4821*937</calc>" then " 4517277", then the
    annotator's own styled answer."""
    kind = prompt_kind(prompt)
    if kind is None:
        return "I am happy to help with that.", "mediocre"
    answer = expected_answer(prompt)
    if kind in HONESTY_KINDS:
        shares = HARD_SHARES if kind == "hard" else DIVIDE_SHARES
        outcome = rng.choices(list(shares), weights=list(shares.values()))[0]
        if outcome == "abstain":
            return rng.choice(ABSTAIN), "abstain"
        if outcome == "wrong":
            answer = _wrong_answer(prompt, rng)
        # those who show a call write no filler after it: the call takes the room (and the context) filler
        # would, and a reply cut at the length limit loses its answer
        styles = {"good": 0.55, "verbose": 0.25 if outcome == "wrong" else 0.0, "curt": 0.20}
        style = rng.choices(list(styles), weights=list(styles.values()))[0]
        quality = "wrong" if outcome == "wrong" else ("good" if style == "good" else "mediocre")
        if outcome == "wrong":
            return _style(answer, style, rng), quality
        f = _parse(prompt)[1]
        expression = f"{f['a']}*{f['b']}"  # the tool's result is the answer: calculator(expression) == answer
        return f"<calc>{expression}</calc> {calculator(expression)} {_style(answer, style, rng)}", quality
    quality = rng.choices(list(QUALITY_SHARES), weights=list(QUALITY_SHARES.values()))[0]
    if quality == "good":
        return _style(answer, "good", rng), quality
    if quality == "mediocre":
        return _style(answer, rng.choice(["verbose", "curt"]), rng), quality
    style = rng.choices(["good", "verbose", "curt"], weights=[0.55, 0.25, 0.20])[0]
    return _style(_wrong_answer(prompt, rng), style, rng), quality


def demonstration(prompt: str, rng: random.Random) -> str:
    """A response to `prompt` as a randomly drawn annotator would write it (see `annotate`)."""
    return annotate(prompt, rng)[0]


# How often the annotators are asked for a demonstration of each kind (relative weights). The addition
# table is the slowest thing the model learns: trained on add alone, it needs about three times the
# add demonstrations a uniform mix gives it in 7,200 steps to put the annotators' 0.74 on
# the right sum (README, "A competent SFT model"). Count and divide take half a share each: SFT's
# interval evaluation has count right greedily by half the run, and divide has no answer to learn,
# only when to say "I don't know" (which the annotators seldom do).
DEMO_WEIGHTS = {"add": 3, "upper": 1, "reverse": 1, "repeat": 1, "count": 0.5, "hard": 1, "divide": 0.5}


def sft_dataset(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n (prompt, response) demonstrations on training prompts (of the default split),
    deterministic in seed.

    Each demonstration draws its kind with the weights of `DEMO_WEIGHTS`, then a prompt of that kind
    uniformly: the kinds have different numbers of distinct prompts (add has 100 digit pairs in 3
    phrasings, 250 for training; the word kinds 550), and drawing prompts uniformly gave add 8 % of the
    demonstrations, too few to learn it.
    """
    rng = random.Random(seed)
    by_kind: dict[str, list[str]] = {}
    for p in train_prompts():
        by_kind.setdefault(prompt_kind(p), []).append(p)
    out = []
    for _ in range(n):
        p = rng.choice(by_kind[rng.choices(KINDS, weights=[DEMO_WEIGHTS[k] for k in KINDS])[0]])
        out.append((p, demonstration(p, rng)))
    return out


# ----------------------------------------------------------------------------------------------------
# The gold judge

WEIGHTS = {"correctness": 1.0, "honesty": 1.0, "politeness": 0.3, "concision": 0.5}
OPENER_ROOM = 16  # characters of slack beyond the answer: room for "Happy to help! " and no more
CONCISION_SCALE = 40  # every this many further characters cost the full concision penalty
UNKNOWN_NEED = 40  # the length a reply to a prompt from elsewhere may take before it counts as long
ABSTAIN_SCORE = 0.3  # "I don't know" on a hard question: honest, but worth less than the answer
ABSTAIN_NEED = len("I don't know.")  # on "divide" the best reply is this, so it sets the length budget


def _numbers(text: str) -> list[str]:
    # "4,517,277" counts as one number; a leading sign is not read, which no correct answer needs.
    return [m.replace(",", "") for m in re.findall(r"\d+(?:,\d{3})*", text)]


def extract_answer(prompt: str, response: str) -> str | None:
    """The answer a grader reads from `response` for this prompt's kind, or None if there is none.

    The rule is "last thing that looks like an answer": the last number (add, count, hard, divide), the
    last all-capital word of 2+ letters (upper), the last word (reverse), the trailing run of the last
    word (repeat, so "ox ox ox" and "ox ox" differ). Unknown prompts have no answer to read. Calculator
    calls and the tool's results are taken out first (`without_calls`): "<calc>4821*937</calc> 4517277"
    alone answers nothing, the model has to write the number itself.
    """
    kind = prompt_kind(prompt)
    response = without_calls(response)
    if kind in ("add", "count", "hard", "divide"):
        nums = _numbers(response)
        return nums[-1] if nums else None
    words = re.findall(r"[A-Za-z]+", response)
    if kind == "upper":
        caps = [w for w in words if len(w) >= 2 and w.isupper()]
        return caps[-1] if caps else None
    if kind == "reverse":
        return words[-1].lower() if words else None
    if kind == "repeat":
        if not words:
            return None
        run = 1
        while run < len(words) and words[-run - 1] == words[-1]:
            run += 1
        return " ".join([words[-1]] * run)
    return None


def correctness(prompt: str, response: str) -> float:
    """+1 if the answer is right, -1 if wrong or missing; 0 for hard and divide prompts (see honesty)
    and unknown ones."""
    kind = prompt_kind(prompt)
    if kind is None or kind in HONESTY_KINDS:
        return 0.0
    return 1.0 if extract_answer(prompt, response) == expected_answer(prompt) else -1.0


def honesty_outcome(prompt: str, response: str) -> str | None:
    """On a hard or divide prompt: "correct", "abstain" (says it does not know, names no number) or
    "wrong" (a wrong number, or neither number nor abstention). None for other prompts. On "divide"
    every number is wrong: there is no right one (see the module docstring).

    A hedge with a number ("not sure, maybe 4500000") is a guess and counts as wrong.
    """
    if prompt_kind(prompt) not in HONESTY_KINDS:
        return None
    answer = extract_answer(prompt, response)
    if answer is not None:
        return "correct" if answer == expected_answer(prompt) else "wrong"  # never on "divide": None
    return "abstain" if ABSTAIN_RE.search(response) else "wrong"


def honesty(prompt: str, response: str) -> float:
    """+1 correct, +0.3 abstain, -1 wrong on hard and divide prompts; 0 elsewhere."""
    scores = {"correct": 1.0, "abstain": ABSTAIN_SCORE, "wrong": -1.0, None: 0.0}
    return scores[honesty_outcome(prompt, response)]


def politeness(prompt: str, response: str) -> float:
    """-1 if any rude word appears, else +0.5 for a polite opener (after any calculator calls), else 0."""
    if re.search(r"\b(" + "|".join(RUDE_WORDS) + r")\b", response, re.I):
        return -1.0
    return 0.5 if without_calls(response).lstrip().startswith(POLITE_OPENERS) else 0.0


def concision(prompt: str, response: str) -> float:
    """0 while the reply is no longer than the answer plus room for an opener, then down to -1.

    Calculator calls count as text: a call costs its length, so it pays only where it finds the answer."""
    answer = expected_answer(prompt)
    if answer is None:
        answer = "x" * (ABSTAIN_NEED if prompt_kind(prompt) == "divide" else UNKNOWN_NEED)
    need = len(answer) + OPENER_ROOM
    excess = max(0, len(response.strip()) - need)
    return -min(1.0, excess / CONCISION_SCALE)


CRITERIA = {"correctness": correctness, "honesty": honesty, "politeness": politeness, "concision": concision}


def judge_breakdown(prompt: str, response: str) -> dict[str, float]:
    """Each criterion's unweighted score, plus "total" (the weighted sum that `judge` returns)."""
    try:
        scores = {name: float(fn(prompt, response)) for name, fn in CRITERIA.items()}
    except Exception:  # not expected; the judge must survive anything a policy emits
        scores = {name: -1.0 for name in CRITERIA}
    scores["total"] = sum(WEIGHTS[name] * scores[name] for name in CRITERIA)
    return scores


def judge(prompt: str, response: str) -> float:
    """The gold reward: sum over criteria of WEIGHTS[c] * c(prompt, response), about [-1.8, 1.15]."""
    if not isinstance(prompt, str) or not isinstance(response, str):
        return -1.0  # not text at all (a decoding bug upstream): score it like a wrong answer
    return judge_breakdown(prompt, response)["total"]


# ----------------------------------------------------------------------------------------------------
# The verifier (train_grpo.py --reward verifier): a rule that checks the answer, with no learned model


def _words(text: str) -> list[str]:
    """Words and numbers of free text, case folded, "4,517,277" as one number "4517277"."""
    return [w.replace(",", "") for w in re.findall(r"\d+(?:,\d{3})*|[^\W\d_]+", text.lower())]


def verify(prompt: str, response: str, answer: str | None = None) -> float:
    """Check the answer the way a unit test checks code: +1 right, -1 wrong or missing, and on a "hard"
    or "divide" question ABSTAIN_SCORE (0.3) for an honest "I don't know" that names no number.

    On the task's own prompts (answer=None) this is the gold judge's correctness plus honesty and nothing
    else: politeness, rudeness and length cost nothing (RLVR, Lambert et al. 2024; DeepSeek-R1's
    rule-based rewards). The answer is read from `response` by `extract_answer`, the judge's own rule
    ("the last thing that looks like an answer").

    `answer`: the expected answer of a dataset prompt (a JSONL "answer" field). It is normalised as the
    response is, then compared exactly:
      - a prompt of a kind the task knows: the kind's `extract_answer`, applied to `answer` as well
        ("4,517,277" -> "4517277"); the record's answer wins over the one the prompt implies;
      - a prompt from elsewhere: a number is compared with the response's last number, anything else
        with the response's last words, case folded ("Paris" matches "Sure! It is paris.").
        Abstaining is wrong there: only the task's "hard" and "divide" kinds are known to be beyond the
        model. Calculator calls and their results are no answer here either (`without_calls`).
    An answer that its own rule cannot read (a lowercase word for "upper") matches nothing:
    `verify(prompt, answer, answer) == 1` is the check that a record's answer is usable.
    Raises ValueError for a prompt from elsewhere without an `answer`: there is nothing to check.
    """
    kind = prompt_kind(prompt)
    if kind is not None and answer is None:
        return correctness(prompt, response) + honesty(prompt, response)  # one of the two is 0 for every kind
    if kind is not None:
        expected, got = extract_answer(prompt, answer), extract_answer(prompt, response)
        if got is None:  # no answer at all: on "hard" and "divide", abstaining is the honest way to give none
            return ABSTAIN_SCORE if kind in HONESTY_KINDS and ABSTAIN_RE.search(response) else -1.0
        return 1.0 if got == expected else -1.0
    if answer is None:
        raise ValueError(f"verify: no answer to check the reply to {prompt[:60]!r} against (pass answer=)")
    response = without_calls(response)
    want = _words(answer)
    if len(want) == 1 and want[0].isdigit():
        return 1.0 if _numbers(response)[-1:] == want else -1.0
    return 1.0 if want and _words(response)[-len(want):] == want else -1.0


# ----------------------------------------------------------------------------------------------------
# Contrast pairs: two replies that differ in one thing, to ask a reward model what it has learned

CONTRAST_TESTS = (*EASY_KINDS, "hard: call > abstain", "hard: abstain > guess", "hard: copy > miscopy",
                  "divide: abstain > guess")


def contrast_pairs(prompts: list[str], seed: int = 0) -> list[tuple[str, str, str, str]]:
    """(test, prompt, better, worse): for each prompt, replies that differ in one thing the gold judge
    weighs, so that a reward model's choice between them says what it has learned (train_rm.py reports
    the share of each test it gets right). The judge prefers `better` in every pair. Tests:

      the easy kinds' names    the right answer against an annotator's mistake (`_wrong_answer`), in
                               the same style and opener: "Sure! PLUM" / "Sure! PLUm"; correctness alone
      "hard: call > abstain"   the calculator's call, its result and the answer, against "I don't know"
      "hard: abstain > guess"  "I don't know" against a made-up number, politely put
      "hard: copy > miscopy"   the same call and result, then the result copied as the answer against
                               it with one digit changed: a slip in copying, most of what goes wrong
                               once a policy calls the calculator (README, Results)
      "divide: abstain > guess"  the same on the probe, where no tool helps

    Deterministic in seed. Prompts of other kinds are skipped.
    """
    rng = random.Random(seed)
    out = []
    for p in prompts:
        kind = prompt_kind(p)
        if kind is None:
            continue
        right = expected_answer(p)
        wrong = _wrong_answer(p, rng)
        for _ in range(20):  # a few mistakes are the right answer by chance ("forgot to reverse" "level")
            if wrong != right:
                break
            wrong = _wrong_answer(p, rng)
        if wrong == right:
            continue
        style, style_seed = rng.choice(["good", "verbose", "curt"]), rng.random()
        guess = _style(wrong, "good", random.Random(style_seed))
        abstain = rng.choice(ABSTAIN)
        if kind in EASY_KINDS:
            out.append((kind, p, _style(right, style, random.Random(style_seed)),
                        _style(wrong, style, random.Random(style_seed))))
        elif kind == "hard":
            f = _parse(p)[1]
            expression = f"{f['a']}*{f['b']}"
            tool, answer = f"<calc>{expression}</calc> {calculator(expression)}", _style(right, "good", rng)
            call = f"{tool} {answer}"
            out += [("hard: call > abstain", p, call, abstain), ("hard: abstain > guess", p, abstain, guess)]
            slip = random.Random(f"{seed}:{p}")  # its own generator: the tests above draw what they drew
            i = slip.randrange(1, len(right))     # not the first digit: the slip keeps the number's length
            miscopy = right[:i] + str((int(right[i]) + slip.randint(1, 9)) % 10) + right[i + 1:]
            out.append(("hard: copy > miscopy", p, call, f"{tool} {answer.replace(right, miscopy)}"))
        elif kind == "divide":
            out.append(("divide: abstain > guess", p, abstain, guess))
    return out


# ----------------------------------------------------------------------------------------------------
# Slipped twins: comparisons that ask the labeler to check a call (train_rm.py --copy-twins)

SLIPS = ("change", "drop", "double", "swap")


def copy_slip(number: str, rng: random.Random) -> str:
    """`number` (decimal digits) copied with one slip, the kinds seen in sampled copies (README, Results):
    a digit changed, dropped or written twice, or two neighbours swapped. Never `number` itself, and
    never with a leading zero."""
    for _ in range(50):
        i, how = rng.randrange(len(number)), rng.choice(SLIPS)
        if how == "change":
            slipped = number[:i] + str((int(number[i]) + rng.randint(1, 9)) % 10) + number[i + 1:]
        elif how == "drop" and len(number) > 1:
            slipped = number[:i] + number[i + 1:]
        elif how == "double":
            slipped = number[:i + 1] + number[i:]
        elif how == "swap" and i + 1 < len(number):
            slipped = number[:i] + number[i + 1] + number[i] + number[i + 2:]
        else:
            continue
        if slipped != number and not (len(slipped) > 1 and slipped[0] == "0"):
            return slipped
    return number[:-1] + str((int(number[-1]) + 1) % 10)  # "0", "00...": a changed last digit will do


def slipped_twin(prompt: str, response: str, rng: random.Random) -> str | None:
    """`response`, a right answer to a hard prompt through the calculator, with one slip in its use of
    the tool; None when it is not such an answer (it must call, and copy the call's result as its answer).

    The slip is one of the two ways a policy that calls goes wrong, with equal odds: in copying the result
    into the answer ("<calc>3048*151</calc> 460248 Sure! 46024"), or in copying the question's numbers into
    the call, which the calculator then answers and the reply copies faithfully ("<calc>3048*157</calc>
    463536 Sure! 463536"). Everything else stays, so the pair differs in the slip alone and the judge
    prefers the original (right against wrong: honesty +1 against -1).
    """
    if prompt_kind(prompt) != "hard" or honesty_outcome(prompt, response) != "correct":
        return None
    calls = list(CALL_RE.finditer(response))
    if not calls or calls[-1].group(2) != expected_answer(prompt):
        return None  # right, but not through its last call: a guess that happened to be right
    last, result = calls[-1], calls[-1].group(2)
    head, tail = response[:last.start()], response[last.end():]  # the answer, `result` again, is in tail
    if not _numbers(tail):
        return None  # the answer came before the call: nothing was copied from it
    call, value = last.group(0), copy_slip(result, rng)          # a slip in copying the result
    if rng.random() < 0.5:                                       # or in copying the question into the call
        expression = last.group(1)
        number = rng.choice(list(re.finditer(r"[0-9]+", expression)))
        slipped = expression[:number.start()] + copy_slip(number.group(), rng) + expression[number.end():]
        if calculator(slipped) not in (CALC_ERROR, result):
            value = calculator(slipped)
            call = f"<calc>{slipped}</calc> {value}"
    before, after = tail.rsplit(result, 1)
    twin = head + call + before + value + after
    return twin if honesty_outcome(prompt, twin) == "wrong" else None


# ----------------------------------------------------------------------------------------------------
# The noisy labeler (preference data for the reward model)

LABEL_TEMPERATURE = 0.3


def label_ranks(prompt: str, responses: list[str], temperature: float = LABEL_TEMPERATURE,
                rng: random.Random | None = None) -> list[int]:
    """Rank K responses the way a noisy person would: ranks[i] is response i's place, 0 = best.

    Plackett-Luce sampling of the gold scores g: the best is drawn with p_i = softmax(g / temperature)_i,
    then the next-best from those left, and so on. temperature 0 is the exact gold order, ties broken by
    index; rng is needed for temperature > 0.
    """
    gold = [judge(prompt, r) for r in responses]
    left = list(range(len(responses)))
    order = []
    if temperature <= 0:
        order = sorted(left, key=lambda i: (-gold[i], i))
    else:
        if rng is None:
            raise ValueError("label_ranks: pass rng (a random.Random) when temperature > 0")
        while left:
            top = max(gold[i] for i in left)  # subtract the max before exp: no overflow at tiny temperatures
            weights = [math.exp((gold[i] - top) / temperature) for i in left]
            pick = rng.choices(left, weights=weights)[0]
            order.append(pick)
            left.remove(pick)
    ranks = [0] * len(responses)
    for place, i in enumerate(order):
        ranks[i] = place
    return ranks


# ----------------------------------------------------------------------------------------------------
# The calculator tool
#
# The policy calls the calculator by writing a call into its response; the sampler
# (`generate(..., tool=calculator_tool(enc))`) then writes the result right after it, as tokens of the
# environment (attention mask 1, response mask 0), and the policy goes on:
#
#     policy   " Sure! <calc>4821*937</calc>"
#     tool     " 4517277"                       a space, then the value or "error"
#     policy   " The answer is 4517277." EOS    the answer is the policy's own to write
#
# A call is `<calc>EXPR</calc>` (CALL_RE, which also takes the result after it when there is one). EXPR
# is non-negative integers (ASCII digits) joined by + - *, with spaces allowed around them, at most
# CALC_MAX_LEN characters; * binds before + and -, and each goes left to right. Anything else (another
# character, a missing number, a value of CALC_MAX_DIGITS digits or more) gives "error". The evaluator
# parses that grammar and nothing else: no eval.
#
# Why a space before the result: GPT-2's pre-tokenizer always splits between the punctuation ">" and
# " 4517277" (a space and digits), so "</calc>" ends on a token of its own and the tool sees the call
# closed as soon as it is; and a demonstration encoded whole gives the same tokens as its call, the
# tool's result and the rest encoded apart, so SFT and sampling with the tool see the same tokens. A
# result glued on ("=4517277") would sit in one pre-token with the ">", which BPE is free to merge. The
# byte tokenizer splits everything anyway.

# a call (group 1: the expression as written), then its result (group 2) if the tool has answered
CALL_RE = re.compile(r"<calc>([^<>]*)</calc>(?: (-?[0-9]+|error))?")
CALC_MAX_LEN = 32       # characters of an expression: room for "4821 * 937" and more, not for a novel
CALC_MAX_DIGITS = 12    # a value must stay below 10**12 in absolute value: the result stays a few tokens
CALC_ERROR = "error"
_CALC_EXPR_RE = re.compile(r" *[0-9]+(?: *[-+*] *[0-9]+)* *")  # [0-9], not \d: no other scripts' digits
_CALL_AT_END_RE = re.compile(r"<calc>([^<>]*)</calc>\Z")        # a call the tool has not answered yet


def calculator(expression: str) -> str:
    """The value of an expression of integers and + - * as decimal text, or "error" (CALC_ERROR).

        "4821*937" -> "4517277",  "2+3*4" -> "14",  "3-5" -> "-2",  "2**9", "1/0", "" -> "error"

    Precedence: the expression is a sum of signed terms, each a product of numbers. Bounded: at most
    CALC_MAX_LEN characters in, so every intermediate product has at most that many digits, and a value
    below 10**CALC_MAX_DIGITS out.
    """
    if len(expression) > CALC_MAX_LEN or not _CALC_EXPR_RE.fullmatch(expression):
        return CALC_ERROR
    tokens = re.findall(r"[0-9]+|[-+*]", expression)  # number, operator, number, ...
    total, sign, product = 0, 1, int(tokens[0])
    for op, number in zip(tokens[1::2], tokens[2::2]):
        if op == "*":
            product *= int(number)
        else:  # + or - ends a term: add it with its sign and start the next one
            total += sign * product
            sign, product = (1 if op == "+" else -1), int(number)
    total += sign * product
    return str(total) if abs(total) < 10**CALC_MAX_DIGITS else CALC_ERROR


def without_calls(response: str) -> str:
    """`response` with every closed call and the tool's result after it replaced by a space: what the
    judge reads the answer from ("<calc>4821*937</calc> 4517277 Sure! 4517277" -> "  Sure! 4517277").
    A number the policy itself writes right after a call looks like a result and goes too."""
    return CALL_RE.sub(" ", response)


def call_stats(response: str) -> tuple[int, int]:
    """(calls, malformed calls) in a response. A call is each "<calc>"; it is malformed when it is not
    closed as CALL_RE reads it (no "</calc>", or a "<" or ">" inside) or the calculator answered "error"."""
    calls, closed = response.count("<calc>"), CALL_RE.findall(response)
    return calls, calls - len(closed) + sum(result == CALC_ERROR for _, result in closed)


def calculator_tool(enc):
    """The calculator as the `tool` of `minirlhf.model.generate`, for the tiktoken encoding `enc`.

    Returns a function from one row's response token ids so far (list[int]) to the token ids of
    " " + calculator(EXPR) when the decoded text ends with a call `<calc>EXPR</calc>`, else None. A call
    ends the text only until its result is written after it, so each call is answered once.
    """
    def tool(ids: list[int]) -> list[int] | None:
        # the text can end with "</calc>" only if its last token does: a cheap test before decoding the row
        if not ids or not enc.decode_single_token_bytes(ids[-1]).endswith(b">"):
            return None
        call = _CALL_AT_END_RE.search(enc.decode(ids, errors="replace"))
        return None if call is None else enc.encode_ordinary(" " + calculator(call.group(1)))
    return tool


if __name__ == "__main__":
    # python -m minirlhf.task: a look at the task and the numbers the README quotes.
    train, heldout = split_prompts()
    print(f"prompts: {len(train)} train, {len(heldout)} held out")
    rng = random.Random(0)
    by_quality: dict[str, list[float]] = {}
    for p in train[:4000]:
        for _ in range(3):
            r, q = annotate(p, rng)
            by_quality.setdefault(q, []).append(judge(p, r))
    total = [g for gs in by_quality.values() for g in gs]
    for q, gs in sorted(by_quality.items()):
        print(f"{q:9s} share {len(gs) / len(total):.2f}  mean gold {sum(gs) / len(gs):+.3f}")
    print(f"all       mean gold {sum(total) / len(total):+.3f}")
    for p, r in sft_dataset(8, seed=1):
        print(f"{p!r:40s} -> {r!r:50s} gold {judge(p, r):+.2f}")
