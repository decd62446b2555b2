"""A customer-support task family that can rank tuning methods: intents of short customer messages.

:func:`support_task` writes messages to an online shop, each asking for one of eight things
(:data:`INTENTS`: a refund, a late delivery, ...). The training split is composed from one set of
phrasings, products, openers and closings; the held-out split from another: other words (reimburse
instead of refund, courier instead of delivery), other sentence structure (the request after a
distractor, questions, indirect statements) and more distractor clauses that deny another intent's
problem ("the courier came promptly, but ..."), sometimes naming another intent outright ("I'm not
asking to cancel anything"). About 5% of the training labels are flipped to another intent (noise);
the held-out labels are clean. Chance is 1/8, and fine-tuning the whole of all-MiniLM-L6-v2 on it
stays clearly below 1.0 (docs/methods.md), so the task separates methods that the sentiment
task of :mod:`peftkit.testing_task` cannot.

The same messages also carry a coarser label (``labels="department"``: which team handles it, four
classes) and another one that cuts across the teams (``labels="action"``: what the agent does about
it, three classes), and :func:`few_shot` takes a balanced handful of training rows, for few-shot
experiments on a related task. :func:`action_few_shot_task` is the few-shot task of automatic
composition (bench/bench_auto_compose.py), whose members learn :func:`intents_of` subsets of the
departments. Every sentence is composed here from the word lists below (nothing taken from an
existing corpus); ``examples/data/make_data.py`` writes the default splits as JSONL files.
"""

from __future__ import annotations

import random
from typing import Iterable, Literal

from peftkit.testing_task import TextTask

#: The eight intents (label order of the ``intent`` task).
INTENTS = ("refund", "delivery_delay", "account_access", "cancel_subscription", "damaged_item",
           "change_address", "double_charge", "wrong_item")
#: The team that handles each intent: the ``department`` task's labels (four classes).
DEPARTMENTS = {"refund": "billing", "double_charge": "billing", "cancel_subscription": "billing",
               "delivery_delay": "shipping", "change_address": "shipping",
               "damaged_item": "returns", "wrong_item": "returns", "account_access": "account"}
#: What the agent does about each intent: the ``action`` task's labels (three classes). They cut across the
#: departments (billing pays back but also ends subscriptions, shipping chases parcels but also updates
#: addresses), so no department and no subset of the intents tells them apart alone.
ACTIONS = {"refund": "pay_back", "double_charge": "pay_back",
           "delivery_delay": "ship_goods", "damaged_item": "ship_goods", "wrong_item": "ship_goods",
           "account_access": "update_account", "cancel_subscription": "update_account",
           "change_address": "update_account"}
#: Fraction of training rows whose label is replaced by another one (held-out rows stay clean).
LABEL_NOISE = 0.05

# What each intent's request says, in the training split's words ...
_TRAIN_REQUESTS = {
    "refund": ["I want a refund for the {item}", "please give me my money back for the {item}",
               "can I get a refund on my {item} order", "I would like my money back, the {item} is not for me",
               "refund the {item} please"],
    "delivery_delay": ["my {item} has not arrived yet", "the delivery of my {item} is late",
                       "where is my {item}, it should be here by now", "my order of the {item} is delayed",
                       "the {item} I ordered is still not here"],
    "account_access": ["I cannot log in to my account", "my password does not work",
                       "I am locked out of my account", "the login page rejects my password",
                       "I can't access my account to check on the {item}"],
    "cancel_subscription": ["please cancel my subscription", "I want to stop my membership",
                            "how do I cancel my monthly plan", "end my subscription at the end of the month",
                            "cancel the plan that came with the {item}"],
    "damaged_item": ["my {item} arrived broken", "the {item} is damaged", "the {item} was cracked when I opened the box",
                     "my {item} stopped working after one day", "the {item} came broken"],
    "change_address": ["I need to change my delivery address", "please update my shipping address",
                       "I moved, can you send the {item} to my new address",
                       "change the address on my order of the {item}", "update the address for the {item}"],
    "double_charge": ["I was charged twice for the {item}", "my card was charged two times for the {item}",
                      "there is a double charge on my statement", "you took the payment twice for my order",
                      "I see two charges for one {item}"],
    "wrong_item": ["I received the wrong item", "you sent me a different {item}", "this is not the {item} I ordered",
                   "the box had the wrong product in it", "I got the wrong {item}"],
}
# ... and in the held-out split's: other words and other constructions, no key word of the above.
_HELD_OUT_REQUESTS = {
    "refund": ["could you reimburse what I paid for the {item}",
               "I expect the full amount for the {item} to be credited back to me",
               "I sent the {item} back and would like to be paid back",
               "is it possible to return the sum I spent on the {item}",
               "kindly reverse my purchase of the {item} and put the funds back where they came from"],
    "delivery_delay": ["still waiting on the parcel with the {item}, the tracking has not changed in a week",
                       "the courier never showed up with my {item}",
                       "it has been ten days and there is no sign of the {item}",
                       "the shipment with my {item} seems stuck somewhere",
                       "when will the {item} finally reach me"],
    "account_access": ["the sign-in screen keeps saying my credentials are invalid",
                       "I got shut out of my profile after the upgrade",
                       "the verification code never reaches my phone, so I can't get in",
                       "my user name is no longer recognised when I try to enter",
                       "the site won't let me into my profile any more"],
    "cancel_subscription": ["I no longer wish to pay for the service, please terminate it",
                            "turn off the automatic renewal and shut down my premium access",
                            "I am done with the premium tier, drop me from it",
                            "I'd like to opt out of the yearly package",
                            "could you discontinue my recurring fee"],
    "damaged_item": ["the {item} came with a shattered part", "there are dents all over the {item}",
                     "the {item} is faulty, it won't switch on", "the {item} was in pieces inside the packaging",
                     "one side of the {item} is smashed"],
    "change_address": ["we relocated last week, so the {item} should go to the flat on Elm Street instead",
                       "please redirect the {item} to my office",
                       "my postal details are out of date, I live somewhere else now",
                       "ship the {item} to my parents' house rather than mine",
                       "is there still time to have the {item} delivered to another place"],
    "double_charge": ["my bank shows the same amount for the {item} taken on two occasions",
                      "the {item} appears as two identical transactions",
                      "I paid once but was debited again for the {item}",
                      "the invoice total is higher than the price of the {item}",
                      "why was I debited a second time for the {item}"],
    "wrong_item": ["the parcel contained someone else's order instead of my {item}",
                   "I ordered the {item} in blue and a red one turned up",
                   "what turned up is not at all the model of {item} I chose",
                   "the package had socks in it rather than the {item}",
                   "this isn't what I picked, the {item} in the box is another brand"],
}
# Distractors: a clause denying another intent's problem, training words ...
_TRAIN_DENIALS = {
    "refund": "I do not want a refund", "delivery_delay": "the delivery was on time",
    "account_access": "I can log in fine", "cancel_subscription": "I want to keep my subscription",
    "damaged_item": "the {item} is not broken", "change_address": "my address is still the same",
    "double_charge": "the payment went through once", "wrong_item": "it is the right {item}",
}
# ... and held-out words, some naming the other intent outright.
_HELD_OUT_DENIALS = {
    "refund": ["no need to pay me back", "I'm not after a reimbursement"],
    "delivery_delay": ["the courier came promptly", "the parcel turned up quickly"],
    "account_access": ["signing in works", "I can get into my profile without trouble"],
    "cancel_subscription": ["I'm keeping the premium tier", "I'm not asking to end anything"],
    "damaged_item": ["the {item} itself is in perfect shape", "nothing is smashed"],
    "change_address": ["I still live at the same place", "the postal details are right"],
    "double_charge": ["my bank records look correct", "I was debited just the one time"],
    "wrong_item": ["it's exactly the model I chose", "the box had what I picked"],
}
_TRAIN_ITEMS = ["jacket", "blender", "phone case", "desk lamp", "backpack", "coffee maker", "rug", "camera"]
_HELD_OUT_ITEMS = ["kettle", "headphones", "yoga mat", "wristwatch", "printer", "sofa cushion", "bicycle helmet"]
_TRAIN_OPENERS = ["", "Hi, ", "Hello, ", "Hey team, "]
_HELD_OUT_OPENERS = ["", "Good morning. ", "Quick question: ", "To whom it may concern: ", "Hiya! "]
_TRAIN_CLOSINGS = ["", " Thanks.", " Please help.", " Order 4471."]
_HELD_OUT_CLOSINGS = ["", " Appreciate it!", " Waiting for your answer.", " Cheers, Sam", " Ref 99-120."]
#: Probability that a message carries a distractor clause, per split.
_TRAIN_DISTRACTION, _HELD_OUT_DISTRACTION = 0.25, 0.5


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def _train_message(intent: str, rng: random.Random) -> str:
    item = rng.choice(_TRAIN_ITEMS)
    request = rng.choice(_TRAIN_REQUESTS[intent]).format(item=item)
    if rng.random() < _TRAIN_DISTRACTION:
        other = rng.choice([i for i in INTENTS if i != intent])
        request = f"{_TRAIN_DENIALS[other].format(item=item)}, but {request}"
    opener = rng.choice(_TRAIN_OPENERS)
    body = request if opener.endswith(", ") else _capitalized(request)
    return f"{opener}{body}.{rng.choice(_TRAIN_CLOSINGS)}"


def _held_out_message(intent: str, rng: random.Random) -> str:
    item = rng.choice(_HELD_OUT_ITEMS)
    request = rng.choice(_HELD_OUT_REQUESTS[intent]).format(item=item)
    if rng.random() < _HELD_OUT_DISTRACTION:
        other = rng.choice([i for i in INTENTS if i != intent])
        denial = rng.choice(_HELD_OUT_DENIALS[other]).format(item=item)
        # the distractor before the request, or after it: word order differs from the training split
        request = rng.choice([f"{_capitalized(denial)}; still, {request}", f"{_capitalized(request)}, although "
                              f"{denial}", f"{_capitalized(denial)}. The thing is, {request}"])
    else:
        request = _capitalized(request)
    end = "?" if request.split(" ", 1)[0].lower() in {"could", "is", "when", "why"} else "."
    return f"{rng.choice(_HELD_OUT_OPENERS)}{request}{end}{rng.choice(_HELD_OUT_CLOSINGS)}"


def _messages(n: int, held_out: bool, rng: random.Random, noise: float, noise_rng: random.Random
              ) -> list[tuple[str, int]]:
    """``n`` balanced messages; ``noise_rng`` (a stream of its own, so the texts do not depend on
    ``noise``) picks the rows whose label is replaced by another one."""
    rows = []
    for i in range(n):
        intent = i % len(INTENTS)
        text = (_held_out_message if held_out else _train_message)(INTENTS[intent], rng)
        if noise_rng.random() < noise:
            intent = noise_rng.choice([j for j in range(len(INTENTS)) if j != intent])
        rows.append((text, intent))
    rng.shuffle(rows)
    return rows


def support_task(n_train: int = 320, n_test: int = 160, seed: int = 0, *,
                 labels: Literal["intent", "department", "action"] = "intent", noise: float = LABEL_NOISE
                 ) -> TextTask:
    """Customer messages labelled with their intent (8 balanced classes, chance 1/8), with the
    department that handles them (``labels="department"``: billing, shipping, returns, account) or with
    what the agent does (``labels="action"``: pay_back, ship_goods, update_account; :data:`ACTIONS`).

    The held-out split shares no request phrasing, product, opener or closing with the training
    split and has more distractor clauses; ``noise`` of the training labels (default 5%) are flipped
    to another intent before any relabelling. The same ``seed`` gives the same rows; the held-out
    split does not depend on ``n_train``."""
    if labels not in ("intent", "department", "action"):
        raise ValueError(f"support_task: labels={labels!r}; use 'intent' (8 classes), 'department' (4 classes) "
                         f"or 'action' (3 classes)")
    if not 0 <= noise < 1:
        raise ValueError(f"support_task: noise={noise!r} must be a fraction in [0, 1)")
    train = _messages(n_train, False, random.Random(f"support-train-{seed}"), noise,
                      random.Random(f"support-noise-{seed}"))
    test = _messages(n_test, True, random.Random(f"support-held-out-{seed}"), 0.0, random.Random(0))
    if labels == "intent":
        return TextTask("support_intent", INTENTS, train, test)
    coarser = DEPARTMENTS if labels == "department" else ACTIONS
    names = tuple(sorted(set(coarser.values())))
    index = {i: names.index(coarser[intent]) for i, intent in enumerate(INTENTS)}
    return TextTask(f"support_{labels}", names, [(t, index[y]) for t, y in train], [(t, index[y]) for t, y in test])


def few_shot(task: TextTask, n: int, seed: int = 0) -> TextTask:
    """``task`` with only ``n`` of its training rows, as balanced over the labels as ``n`` allows (the
    labels take turns; within a label a seeded random choice); the held-out split is unchanged."""
    if not 0 < n <= len(task.train):
        raise ValueError(f"few_shot: n={n} must be between 1 and the {len(task.train)} training rows")
    rng = random.Random(f"few-shot-{seed}")
    chosen = _labels_in_turns(task, n, rng)
    rng.shuffle(chosen)
    return TextTask(f"{task.name}_{n}shot", task.labels, chosen, task.test)


def _labels_in_turns(task: TextTask, n: int, rng: random.Random) -> list[tuple[str, int]]:
    """``n`` training rows, the labels taking turns (within a label, in a random order drawn from ``rng``)."""
    pools = [[row for row in task.train if row[1] == label] for label in range(len(task.labels))]
    for pool in pools:
        rng.shuffle(pool)
    chosen: list[tuple[str, int]] = []
    while len(chosen) < n:
        for pool in pools:
            if pool and len(chosen) < n:
                chosen.append(pool.pop())
    return chosen


def action_few_shot_task(n: int = 64, seed: int = 1) -> TextTask:
    """The few-shot task of automatic composition: ``labels="action"`` (pay_back, ship_goods,
    update_account) on the messages of ``support_task(seed=seed)`` (seed 1: other messages than the
    default split that members train on), ``n`` clean training rows (no label noise: a hand-checked
    handful) and the 160 paraphrased held-out rows. The training rows come with the labels taking turns,
    so that every prefix (the first 8 or 16 of 64) is as balanced as its length allows: one file serves
    every few-shot size."""
    task = support_task(seed=seed, labels="action", noise=0.0)
    if not 0 < n <= len(task.train):
        raise ValueError(f"action_few_shot_task: n={n} must be between 1 and the {len(task.train)} training rows")
    chosen = _labels_in_turns(task, n, random.Random(f"action-few-shot-{seed}"))
    return TextTask(f"support_action_{n}shot", task.labels, chosen, task.test)


def intents_of(task: TextTask, departments: Iterable[str]) -> TextTask:
    """The rows of an intent ``task`` whose intent one of ``departments`` handles, labelled with those
    intents only (in :data:`INTENTS` order): a member that knows part of the family, e.g.
    ``intents_of(support_task(), ["billing", "shipping"])`` (5 intents)."""
    if task.labels != INTENTS:
        raise ValueError(f"intents_of: {task.name} is not labelled with the intents (labels='intent')")
    wanted = set(departments)
    unknown = wanted - set(DEPARTMENTS.values())
    if unknown or not wanted:
        raise ValueError(f"intents_of: departments {sorted(unknown) or '(none)'}; choose from "
                         f"{', '.join(sorted(set(DEPARTMENTS.values())))}")
    kept = tuple(intent for intent in INTENTS if DEPARTMENTS[intent] in wanted)

    def keep(rows: list[tuple[str, int]]) -> list[tuple[str, int]]:
        return [(text, kept.index(INTENTS[y])) for text, y in rows if INTENTS[y] in kept]

    return TextTask(f"support_intent_{'_'.join(sorted(wanted))}", kept, keep(task.train), keep(task.test))


def vocabulary(rows: list[tuple[str, int]]) -> set[str]:
    """The lower-cased words of ``rows``' texts (punctuation stripped): to compare splits."""
    return {w.strip(".,;:?!'").lower() for text, _ in rows for w in text.split()} - {""}
