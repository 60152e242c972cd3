"""Openers: the first lines of documents of many kinds, generated from a fixed seed, for the target to continue.

The corpus (train/corpus.py) has Python code, Python documentation and a few generated formats; users feed a
Gemma model far more kinds of text (code in other languages, configs, logs, e-mails, news, stories, worked
maths, translations). A drafter learns what the target *writes* after such openings, so we only need the
openings: the target's own greedy continuation is the training text (train/selfgen.py). Every opener is built
from small word lists and templates below, so the set is reproducible and needs no download.
"""

from __future__ import annotations

import hashlib
import json
import random

from .corpus import _CITIES, _NAMES, Document

_THINGS = ["invoice", "order", "user", "ticket", "product", "booking", "payment", "sensor reading", "shipment",
           "comment", "task", "playlist", "recipe", "book", "employee", "account", "message", "device"]
_VERBS = [("parse", "Parse"), ("validate", "Validate"), ("format", "Format"), ("merge", "Merge"), ("sort", "Sort"),
          ("filter", "Filter"), ("count", "Count"), ("group", "Group"), ("normalize", "Normalize"),
          ("serialize", "Serialize"), ("load", "Load"), ("find", "Find"), ("compute", "Compute"), ("retry", "Retry")]
_TOPICS = ["the new bridge", "a water shortage", "the school budget", "a rare bird sighting", "the city marathon",
           "a data breach", "the harvest festival", "rising rents", "a solar farm", "the museum reopening",
           "a train strike", "the chess championship", "a flood warning", "the library expansion"]
_COMPANIES = ["Northwind", "Acme Corp", "Globex", "Initech", "Umbrella Health", "Stark Logistics", "Blue Harbor",
              "Pinecrest Labs", "Redwood Bank", "Lumen Energy"]


def _snake(verb: str, thing: str) -> str:
    return f"{verb}_{thing.replace(' ', '_')}s"


def _camel(verb: str, thing: str) -> str:
    parts = thing.split()
    return verb + "".join(p.capitalize() for p in parts) + "s"


def code_opener(rng: random.Random) -> str:
    verb, Verb = rng.choice(_VERBS)
    thing = rng.choice(_THINGS)
    desc = f"{Verb} a list of {thing}s"
    snake, camel = _snake(verb, thing), _camel(verb, thing)
    Type = "".join(p.capitalize() for p in thing.split())
    lang = rng.randrange(12)
    if lang == 0:
        return f'from dataclasses import dataclass\n\n\n@dataclass\nclass {Type}:\n    id: int\n    name: str\n\n\ndef {snake}(items: list[{Type}]) -> list[{Type}]:\n    """{desc}."""\n'
    if lang == 1:
        return f"/**\n * {desc}.\n * @param {{Array<Object>}} items\n * @returns {{Array<Object>}}\n */\nfunction {camel}(items) {{\n"
    if lang == 2:
        return f"export interface {Type} {{\n  id: number;\n  name: string;\n  createdAt: Date;\n}}\n\nexport function {camel}(items: {Type}[]): {Type}[] {{\n"
    if lang == 3:
        return f"/// {desc}.\npub fn {snake}(items: &[{Type}]) -> Vec<{Type}> {{\n"
    if lang == 4:
        return f"package {thing.split()[0]}\n\n// {camel[0].upper() + camel[1:]} {desc[0].lower() + desc[1:]}.\nfunc {camel[0].upper() + camel[1:]}(items []{Type}) ([]{Type}, error) {{\n"
    if lang == 5:
        return f"#include <stdio.h>\n#include <stdlib.h>\n#include <string.h>\n\n/* {desc}. Returns the new count. */\nint {snake}(struct {thing.replace(' ', '_')} *items, size_t n)\n{{\n"
    if lang == 6:
        return f"public class {Type}Service {{\n\n    /**\n     * {desc}.\n     */\n    public List<{Type}> {camel}(List<{Type}> items) {{\n"
    if lang == 7:
        table = thing.replace(" ", "_") + "s"
        return f"-- {desc} ({rng.choice(_COMPANIES)} database)\nCREATE TABLE {table} (\n    id BIGSERIAL PRIMARY KEY,\n"
    if lang == 8:
        return f"#!/usr/bin/env bash\n# {snake}.sh - {desc[0].lower() + desc[1:]} from the nightly export.\n#\n# Usage: {snake}.sh INPUT_DIR OUTPUT_DIR\n\nset -euo pipefail\n\n"
    if lang == 9:
        return f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n  <meta charset=\"utf-8\">\n  <title>{rng.choice(_COMPANIES)} - {Type}s</title>\n"
    if lang == 10:
        return f"# {rng.choice(_COMPANIES)} {thing} service\nversion: \"3.9\"\nservices:\n  {thing.split()[0]}-api:\n    image: {thing.split()[0]}-api:latest\n"
    return f"class {Type}Repository:\n    \"\"\"Stores {thing}s in SQLite.\"\"\"\n\n    def __init__(self, path: str) -> None:\n"


def _record(rng: random.Random, i: int) -> dict:
    name = rng.choice(_NAMES)
    return {"id": 1000 + i, "name": f"{name} {rng.choice(['Smith', 'Garcia', 'Chen', 'Okafor', 'Novak', 'Silva'])}",
            "email": f"{name.lower()}{rng.randint(1, 99)}@example.com", "city": rng.choice(_CITIES),
            "active": rng.random() < 0.7}


def json_opener(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:  # an array of records, cut after a few
        return json.dumps([_record(rng, i) for i in range(rng.randint(2, 3))], indent=2)[:-2] + ",\n"
    if kind == 1:  # JSON lines logs
        lines = [json.dumps({"ts": f"2026-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}T0{i}:1{i}:00Z",
                             "level": rng.choice(["info", "warn", "error"]), "service": rng.choice(_THINGS).split()[0],
                             "event": f"{rng.choice(_THINGS).split()[0]}_{rng.choice(['created', 'updated', 'failed'])}",
                             "duration_ms": rng.randint(3, 900)}) for i in range(rng.randint(2, 4))]
        return "\n".join(lines) + "\n"
    if kind == 2:  # a config / manifest
        name = rng.choice(_THINGS).replace(" ", "-")
        return (f'{{\n  "name": "@{rng.choice(_COMPANIES).split()[0].lower()}/{name}",\n  "version": "{rng.randint(0, 3)}.'
                f'{rng.randint(0, 9)}.{rng.randint(0, 9)}",\n  "description": "{rng.choice(_VERBS)[1]} {name}s",\n  "scripts": {{\n')
    if kind == 3:  # a tool call
        name, params = rng.choice([("get_weather", "city"), ("book_table", "restaurant"), ("send_message", "to"),
                                   ("lookup_order", "order_id"), ("create_reminder", "text")])
        return (f'You can call tools. Answer with one JSON object {{"tool": NAME, "arguments": {{...}}}}.\n'
                f'Tools: {name}({params}), search(query)\n\nUser: please {name.replace("_", " ")} for {rng.choice(_NAMES)} '
                f'in {rng.choice(_CITIES)}\nAssistant: {{"tool": "{name}", "arguments": {{')
    obj = {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {"name": c},
           "geometry": {"type": "Point", "coordinates": [round(rng.uniform(-180, 180), 4), round(rng.uniform(-80, 80), 4)]}}
           for c in rng.sample(_CITIES, 2)]}
    return json.dumps(obj, indent=2)[:-6] + ",\n"


def prose_opener(rng: random.Random) -> str:
    a, b = rng.sample(_NAMES, 2)
    city, topic, company = rng.choice(_CITIES), rng.choice(_TOPICS), rng.choice(_COMPANIES)
    kind = rng.randrange(9)
    if kind == 0:
        return f"{topic[0].upper() + topic[1:]} divides {city}\n\n{city}, {rng.randint(2, 28)} March - Officials said on Tuesday that {topic}"
    if kind == 1:
        return f"From: {a} <{a.lower()}@{company.split()[0].lower()}.com>\nTo: {b}\nSubject: Re: {topic}\n\nHi {b},\n\n"
    if kind == 2:
        return f"Meeting notes - {company}, weekly sync\n\nAttendees: {a}, {b}, {rng.choice(_NAMES)}\n\n1. {topic[0].upper() + topic[1:]}\n- "
    if kind == 3:
        return f"Once upon a time, in a small village near {city}, there lived a {rng.choice(['fox', 'baker', 'girl', 'robot', 'king'])} named {a} who"
    if kind == 4:
        return f"Dear {b},\n\nI am writing to you from {city}. It has been {rng.randint(2, 20)} years since"
    if kind == 5:
        return f"{company} {rng.choice(_THINGS).title()} Manager - User Guide\n\n1. Getting started\n\nTo"
    if kind == 6:
        return f"INT. {rng.choice(['KITCHEN', 'SPACESHIP', 'OFFICE', 'TRAIN STATION'])} - NIGHT\n\n{a.upper()} enters, soaked from the rain.\n\n{a.upper()}\n"
    if kind == 7:
        return f"Ticket #{rng.randint(10000, 99999)} - \"{rng.choice(_THINGS).title()}s not syncing\"\nCustomer: {company}\nReported by: {a}\n\nDescription:\n"
    return f"Abstract\n\nBackground: {topic[0].upper() + topic[1:]} has been linked to"


_PHRASES = {
    "French": [("Where is the bank?", "Où est la banque ?"), ("Thank you very much.", "Merci beaucoup."),
               ("I would like a coffee, please.", "Je voudrais un café, s'il vous plaît.")],
    "Spanish": [("Where is the bank?", "¿Dónde está el banco?"), ("Thank you very much.", "Muchas gracias."),
                ("I would like a coffee, please.", "Quisiera un café, por favor.")],
    "German": [("Where is the bank?", "Wo ist die Bank?"), ("Thank you very much.", "Vielen Dank."),
               ("I would like a coffee, please.", "Ich hätte gern einen Kaffee, bitte.")],
    "Italian": [("Where is the bank?", "Dov'è la banca?"), ("Thank you very much.", "Grazie mille."),
                ("I would like a coffee, please.", "Vorrei un caffè, per favore.")],
}
_SENTENCES = ["The meeting has been moved to Friday.", "Please restart the device before updating.",
              "Our store opens at nine in the morning.", "The train to {city} is delayed by twenty minutes.",
              "{a} will send you the report tomorrow.", "Do you have a room for two nights?",
              "The museum is closed on Mondays.", "How much does the ticket cost?"]


def translation_opener(rng: random.Random) -> str:
    lang = rng.choice(list(_PHRASES))
    shots = rng.sample(_PHRASES[lang], 2)
    text = "".join(f"English: {en}\n{lang}: {tr}\n\n" for en, tr in shots)
    sentence = rng.choice(_SENTENCES).format(city=rng.choice(_CITIES), a=rng.choice(_NAMES))
    return text + f"English: {sentence}\n{lang}:"


def math_opener(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(100, 9999), rng.randint(12, 999)
        return f"Multiply {a} by {b} step by step.\n\nStep 1:"
    if kind == 1:
        price, n, m = rng.choice([2, 3, 4, 5, 12]), rng.randint(3, 40), rng.randint(2, 30)
        return (f"Question: {rng.choice(_NAMES)} buys {n} notebooks at ${price} each and {m} pens at $1.50 each. "
                f"How much does {rng.choice(['she', 'he'])} spend in total?\nAnswer: Let's solve it step by step.\n")
    if kind == 2:
        x, a = rng.randint(2, 20), rng.randint(2, 9)
        c = rng.randint(1, 30)
        return f"Solve for x: {a}x + {c} = {a * x + c}\n\nSubtract {c} from both sides:"
    return f"Simplify the fraction {rng.randint(2, 20) * 6}/{rng.randint(21, 40) * 6}.\n\nThe greatest common divisor is"


GENRES = {"code": code_opener, "json": json_opener, "prose": prose_opener, "translation": translation_opener,
          "math": math_opener}


def openers(n: int, seed: int = 23) -> list[Document]:
    """n openers, genres in turn (code and JSON twice as often: they are where drafting pays most). The
    templates repeat now and then: a text's split follows the text itself, so no held-out prompt is trained on."""
    rng = random.Random(seed)
    order = ["code", "json", "prose", "code", "json", "math", "translation", "prose"]
    docs = []
    for i in range(n):
        genre = order[i % len(order)]
        text = GENRES[genre](rng)
        docs.append(Document(f"opener/{genre}/{i}", "opener-" + genre, text,
                             split_of="opener-text/" + hashlib.sha256(text.encode()).hexdigest()))
    return docs


POOL_SIZE = 16384  # fixed, so that a resumed run with a larger N draws the same openers first


def opener_pool(seed: int = 0) -> list[Document]:
    """The distinct openers a run draws from (in a fixed order per seed; about 11k, 5% of them held out)."""
    seen, pool = set(), []
    for d in openers(POOL_SIZE, seed=seed + 23):
        if d.text not in seen:
            seen.add(d.text)
            pool.append(d)
    return pool
