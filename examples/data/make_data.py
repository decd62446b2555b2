"""Regenerate the example datasets in this folder (deterministic: same seed, same files).

    python examples/data/make_data.py

Every sentence is composed here (the support_* files by peftkit.testing_intents) from
small word lists; nothing is copied from an existing corpus. See README.md in this folder.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

SUBJECTS = ["The movie", "This film", "The plot", "The acting", "The soundtrack", "The ending", "The sequel",
            "The director's cut", "The first half", "The dialogue", "The cast", "The story"]
POSITIVE = ["wonderful", "moving", "brilliant", "delightful", "gripping", "charming", "superb", "memorable",
            "clever", "beautiful", "heartfelt", "funny"]
NEGATIVE = ["dull", "tedious", "clumsy", "forgettable", "boring", "messy", "predictable", "lifeless", "awful",
            "shallow", "confusing", "bland"]
ADVERBS = ["", "really ", "quite ", "truly ", "rather ", "very ", "surprisingly "]
ENDINGS = [".", " from start to finish.", ", as far as I can tell.", " overall.", " in my opinion.",
           " and I would say so again."]

TOPICS = {
    "sports": ["The striker scored twice in the final", "Our team won the match after extra time",
               "The marathon starts at dawn on Sunday", "She broke the national record in the sprint",
               "The coach changed the lineup at half time", "The tennis final went to five sets",
               "Fans filled the stadium for the derby", "The cyclist climbed the mountain stage alone"],
    "food": ["This soup needs more salt and pepper", "The bakery sells fresh bread every morning",
             "Slow roast the vegetables with olive oil", "The recipe calls for two cups of flour",
             "We ordered noodles and dumplings for dinner", "The chef grilled the fish over charcoal",
             "Let the dough rest for an hour", "The market had ripe tomatoes and peaches"],
    "tech": ["The new laptop has a faster processor", "Update the app to fix the login bug",
             "The server restarts after every deployment", "This phone takes sharp photos at night",
             "The database query now runs in milliseconds", "Install the driver before plugging it in",
             "The compiler reports an error on line ten", "Cloud storage prices dropped this year"],
    "travel": ["The train to the coast leaves at nine", "We booked a small hotel near the harbour",
               "Pack light if you take the night bus", "The museum is closed on Mondays",
               "The flight was delayed by two hours", "Hike to the lake before the crowds arrive",
               "Our guide showed us the old town walls", "Rent a bike to explore the islands"],
}
TOPIC_OPENERS = ["", "Apparently, ", "I heard that ", "Note: ", "Today: ", "Fun fact: "]

PEOPLE = ["Alice", "Bruno", "Chen", "Dara", "Emeka", "Farah", "Goran", "Hana"]
PLACES = ["Lisbon", "Nairobi", "Oslo", "Quito", "Seoul", "Tunis", "Lyon", "Perth"]
ORGS = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay"]
NER_TEMPLATES = [["{per}", "works", "at", "{org}", "in", "{loc}"], ["{per}", "met", "{per2}", "in", "{loc}"],
                 ["{org}", "opened", "an", "office", "in", "{loc}"], ["{per}", "left", "{org}", "last", "year"],
                 ["Yesterday", "{per}", "flew", "to", "{loc}"]]

# Support messages: does this need someone now? Held-out rows use other wordings too.
URGENT = ["The payment page is down for every customer", "Our production database is not responding",
          "Nobody can log in since this morning", "The checkout keeps failing with an error",
          "Customers are being charged twice", "The whole site shows a blank page",
          "Orders stopped syncing an hour ago", "The API returns errors for all requests"]
ROUTINE = ["Could you update the logo on our invoices", "Please add a dark theme some day",
           "How do I change my notification settings", "Can we rename the project folder",
           "I would like a copy of last year's receipts", "Is there a guide for exporting reports",
           "Please fix the typo on the pricing page", "Could the weekly email arrive on Mondays"]
URGENT_TAILS = [", please help now!", ", this is critical.", " and we are losing sales.", ", urgent!", "."]
ROUTINE_TAILS = [" when you have time.", ", no rush.", ", thanks!", " at some point.", "."]

# Short reviews of places and things, for automatic composition (opinion as in sentiment, domains as in
# topic, new labels): would the writer recommend it? The held-out split also uses words the train split lacks.
REVIEW_THINGS = {"food": ["the noodle bar", "this bakery", "the taco truck", "the corner cafe", "that pizza place"],
                 "travel": ["the harbour hotel", "this hostel", "the night train", "the city tour", "that beach resort"],
                 "tech": ["this laptop", "the new phone", "the budget headphones", "this smart watch", "the router"]}
REVIEW_GOOD = ["fantastic", "excellent", "lovely", "great value", "a real treat", "spotless", "friendly", "reliable"]
REVIEW_BAD = ["a disaster", "overpriced", "filthy", "rude", "a waste of money", "broken after a week", "noisy",
              "disappointing"]
REVIEW_GOOD_HELD = ["superb", "outstanding", "a delight"]
REVIEW_BAD_HELD = ["dreadful", "a rip-off", "miserable"]
REVIEW_FRAMES = ["Honestly, {thing} was {word}.", "We tried {thing}: {word}.", "{Thing} turned out {word}.",
                 "My verdict on {thing}? {Word}.", "{Thing} is {word}, would say the same again."]

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def sentiment(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        word = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        text = f"{rng.choice(SUBJECTS)} was {rng.choice(ADVERBS)}{word}{rng.choice(ENDINGS)}"
        rows.append({"text": text, "label": label})
    return rows


def topic(rng: random.Random, n: int) -> list[dict]:
    names = sorted(TOPICS)
    rows = []
    for i in range(n):
        label = names[i % len(names)]
        opener, sentence = rng.choice(TOPIC_OPENERS), rng.choice(TOPICS[label])
        if opener:
            sentence = sentence[0].lower() + sentence[1:]
        rows.append({"text": f"{opener}{sentence}.", "label": label})
    return rows


def ner(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        per, per2 = rng.sample(PEOPLE, 2)
        fill = {"{per}": (per, "B-PER"), "{per2}": (per2, "B-PER"), "{org}": (rng.choice(ORGS), "B-ORG"),
                "{loc}": (rng.choice(PLACES), "B-LOC")}
        tokens, tags = [], []
        for word in rng.choice(NER_TEMPLATES):
            token, tag = fill.get(word, (word, "O"))
            tokens.append(token)
            tags.append(tag)
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def instructions(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        a = rng.randrange(len(NUMBERS) - 1)
        kind = rng.choice(["next", "word", "double"])
        if kind == "next":
            rows.append({"prompt": f"Question: what number comes after {NUMBERS[a]}?\nAnswer:",
                         "completion": f" {NUMBERS[a + 1]}"})
        elif kind == "word":
            rows.append({"prompt": f"Question: write {a} as a word.\nAnswer:", "completion": f" {NUMBERS[a]}"})
        else:
            b = a % 6
            rows.append({"prompt": f"Question: what is {NUMBERS[b]} plus {NUMBERS[b]}?\nAnswer:",
                         "completion": f" {NUMBERS[2 * b]}"})
    return rows


def urgency(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        label = "urgent" if i % 2 == 0 else "routine"
        sentences, tails = (URGENT, URGENT_TAILS) if label == "urgent" else (ROUTINE, ROUTINE_TAILS)
        rows.append({"text": f"{rng.choice(sentences)}{rng.choice(tails)}", "label": label})
    return rows


def reviews(rng: random.Random, n: int, held_out: bool) -> list[dict]:
    rows = []
    for i in range(n):
        label = "recommend" if i % 2 == 0 else "avoid"
        words = REVIEW_GOOD if label == "recommend" else REVIEW_BAD
        if held_out:
            words = words + (REVIEW_GOOD_HELD if label == "recommend" else REVIEW_BAD_HELD)
        thing, word = rng.choice(REVIEW_THINGS[rng.choice(sorted(REVIEW_THINGS))]), rng.choice(words)
        text = rng.choice(REVIEW_FRAMES).format(thing=thing, Thing=thing[0].upper() + thing[1:], word=word,
                                                Word=word[0].upper() + word[1:])
        rows.append({"text": text, "label": label})
    return rows


def support_files() -> None:
    """The support-message task family (peftkit.testing_intents, which holds its word lists): intents
    (8 classes) and departments (4 classes), the default splits of support_task(); and the few-shot
    action task of automatic composition (3 classes, 64 training rows), action_few_shot_task()."""
    from peftkit.testing_intents import action_few_shot_task, support_task

    tasks = {labels: support_task(labels=labels) for labels in ("intent", "department")}
    tasks["action"] = action_few_shot_task()
    for labels, task in tasks.items():
        for split, rows in (("train", task.train), ("eval", task.test)):
            write_jsonl(f"support_{labels}_{split}.jsonl", [{"text": t, "label": task.labels[y]} for t, y in rows])


def write_jsonl(name: str, rows: list[dict]) -> None:
    (HERE / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    rng = random.Random(20240601)
    write_jsonl("sentiment_train.jsonl", sentiment(rng, 160))
    write_jsonl("sentiment_eval.jsonl", sentiment(rng, 40))
    write_jsonl("topic_train.jsonl", topic(rng, 160))
    write_jsonl("topic_eval.jsonl", topic(rng, 40))
    write_jsonl("ner_train.jsonl", ner(rng, 80))
    write_jsonl("ner_eval.jsonl", ner(rng, 20))
    write_jsonl("instructions_train.jsonl", instructions(rng, 120))
    write_jsonl("instructions_eval.jsonl", instructions(rng, 30))
    with (HERE / "sentiment_train.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(sentiment(random.Random(7), 40))
    urgency_rng = random.Random(20241128)  # its own stream: the files above stay as they were
    write_jsonl("urgency_train.jsonl", urgency(urgency_rng, 160))
    write_jsonl("urgency_eval.jsonl", urgency(urgency_rng, 40))
    review_rng = random.Random(20261202)  # its own stream too
    write_jsonl("reviews_train.jsonl", reviews(review_rng, 64, held_out=False))
    write_jsonl("reviews_eval.jsonl", reviews(review_rng, 80, held_out=True))
    support_files()


if __name__ == "__main__":
    main()
