"""The acceptance corpora of issue 23: 50 different strict JSON schemas and 20 tool sets.

Each schema is strict in OpenAI's sense (every property required, additionalProperties false)
and small enough that a 135M model's answer fits in a short max_tokens; together they cover
strings (plain, bounded, enum, pattern-free), integers and numbers with bounds, booleans,
nested objects, arrays (bounded and not), anyOf, nullable fields and const.
"""

SCALARS = {
    "name": {"type": "string", "maxLength": 20},
    "city": {"type": "string", "maxLength": 24},
    "title": {"type": "string", "maxLength": 30},
    "word": {"type": "string", "maxLength": 12},
    "colour": {"enum": ["red", "green", "blue", "yellow"]},
    "unit": {"enum": ["celsius", "fahrenheit"]},
    "size": {"enum": ["small", "medium", "large"]},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "count": {"type": "integer", "minimum": 1, "maximum": 10},
    "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
    "score": {"type": "number", "minimum": 0, "maximum": 1},
    "price": {"type": "number", "minimum": 0, "maximum": 1000},
    "ok": {"type": "boolean"},
    "done": {"type": "boolean"},
    "note": {"type": ["string", "null"], "maxLength": 16},
    "kind": {"const": "record"},
}


def obj(**props):
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def _schemas():
    s = SCALARS
    out = []
    # Pairs and triples of scalar fields (30 schemas).
    names = list(s)
    for i in range(len(names)):
        a, b = names[i], names[(i + 3) % len(names)]
        out.append(obj(**{a: s[a], b: s[b]}))
    for i in range(len(names) - 2):
        a, b, c = names[i], names[(i + 5) % len(names)], names[(i + 9) % len(names)]
        if len({a, b, c}) == 3:
            out.append(obj(**{a: s[a], b: s[b], c: s[c]}))
    for i in range(0, len(names), 3):
        a, b, c = names[i], names[(i + 2) % len(names)], names[(i + 7) % len(names)]
        if len({a, b, c}) == 3:
            out.append(obj(**{c: s[c], a: s[a], b: s[b]}))
    # Arrays.
    out.append(obj(tags={"type": "array", "items": s["word"], "maxItems": 3}))
    out.append(obj(scores={"type": "array", "items": s["score"], "minItems": 1, "maxItems": 4}))
    out.append(obj(colours={"type": "array", "items": s["colour"], "maxItems": 4}, count=s["count"]))
    out.append(obj(years={"type": "array", "items": s["year"], "maxItems": 3}, ok=s["ok"]))
    # Nesting.
    out.append(obj(person=obj(name=s["name"], age=s["age"])))
    out.append(obj(place=obj(city=s["city"], year=s["year"]), ok=s["ok"]))
    out.append(obj(item=obj(title=s["title"], price=s["price"], size=s["size"])))
    out.append(obj(people={"type": "array", "items": obj(name=s["name"], age=s["age"]), "maxItems": 2}))
    out.append(obj(a=obj(b=obj(c=s["count"]))))
    # anyOf and nullable.
    out.append(obj(value={"anyOf": [s["count"], s["word"]]}))
    out.append(obj(result={"anyOf": [obj(ok=s["ok"]), obj(error=s["word"])]}))
    out.append(obj(note=s["note"], done=s["done"]))
    out.append(obj(kind=s["kind"], name=s["name"]))
    # Unbounded strings (the model must close them itself).
    out.append(obj(answer={"type": "string"}))
    out.append(obj(city={"type": "string"}, country={"type": "string"}))
    # Deduplicate, keep the first 50.
    seen, unique = set(), []
    for schema in out:
        key = repr(schema)
        if key not in seen:
            seen.add(key)
            unique.append(schema)
    return unique[:50]


SCHEMAS = _schemas()
assert len(SCHEMAS) == 50, len(SCHEMAS)


def function(fname, description, **props):
    return {"type": "function", "function": {"name": fname, "description": description, "parameters": obj(**props)}}


def _tool_sets():
    s = SCALARS
    weather = function("get_weather", "Current weather in a city", city=s["city"], unit=s["unit"])
    time = function("get_time", "Current time in a city", city=s["city"])
    search = function("search", "Search the web", query={"type": "string", "maxLength": 40}, count=s["count"])
    email = function("send_email", "Send an email", to={"type": "string", "maxLength": 30},
                     subject=s["title"], urgent=s["ok"])
    calc = function("add", "Add two numbers", a={"type": "number"}, b={"type": "number"})
    book = function("book_table", "Book a restaurant table", name=s["name"], people=s["count"], year=s["year"])
    convert = function("convert", "Convert a price", price=s["price"], currency={"enum": ["EUR", "USD", "GBP"]})
    paint = function("paint", "Paint a wall", colour=s["colour"], size=s["size"])
    remind = function("remind", "Set a reminder", title=s["title"], minutes={"type": "integer", "minimum": 1, "maximum": 600})
    lookup = function("lookup_person", "Find a person", person=obj(name=s["name"], age=s["age"]))
    tags = function("tag", "Tag a document", tags={"type": "array", "items": s["word"], "maxItems": 3})
    noop = {"type": "function", "function": {"name": "ping", "description": "Check the service"}}
    sets = [
        ([weather], "What's the weather in Paris?"),
        ([weather, time], "What time is it in Tokyo?"),
        ([search], "Find recipes for pancakes."),
        ([email], "Email bob@example.com that the meeting moved."),
        ([calc], "What is 2.5 plus 4?"),
        ([book], "Book a table for 4 people for Alice."),
        ([convert], "Convert 20 dollars to euros."),
        ([paint], "Paint the big wall blue."),
        ([remind], "Remind me to call mum in 30 minutes."),
        ([lookup], "Who is John, 42 years old?"),
        ([tags], "Tag this note as work and urgent."),
        ([noop], "Is the service up?"),
        ([weather, search, calc], "Add 3 and 9."),
        ([time, email], "Tell Carol the time in Berlin by email."),
        ([book, remind], "Remind me about dinner in an hour."),
        ([paint, convert, noop], "Paint a small red wall."),
        ([lookup, tags], "Find Maria, 31."),
        ([search, weather, time, calc], "Weather in Rome in fahrenheit?"),
        ([email, remind, book, paint, tags], "Email Dan about the party."),
        ([weather, time, search, email, calc, noop], "Search for the tallest tower."),
    ]
    return sets


TOOL_SETS = _tool_sets()
assert len(TOOL_SETS) == 20
