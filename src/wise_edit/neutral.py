"""Built-in neutral text: the irrelevant-prompt pool when the user gives none, the text
the routing score scale and key radius are calibrated on (everyday statements, no facts
to edit), and the check that an edit's subject is named in its prompt."""

from __future__ import annotations

import re

NEUTRAL_PROMPTS: tuple[str, ...] = (
    "The weather today is mild with a light breeze from the west.",
    "She poured a cup of tea and sat down by the window.",
    "Please remember to close the door when you leave the room.",
    "The children played in the park until the sun went down.",
    "He wrote a short note and left it on the kitchen table.",
    "A good night's sleep helps people think more clearly.",
    "The train was a few minutes late because of the rain.",
    "They decided to walk home instead of taking the bus.",
    "Fresh bread smells wonderful early in the morning.",
    "The meeting will start after everyone has arrived.",
    "Water boils faster when the pot is covered with a lid.",
    "My neighbour has a small garden full of tomatoes.",
    "The library is quiet on Sunday afternoons.",
    "It is easier to learn a skill by practising a little every day.",
    "The cat slept in a patch of sunlight on the floor.",
    "We need to buy milk, eggs and a loaf of bread.",
    "The road curves gently along the side of the hill.",
    "Someone left an umbrella leaning against the wall.",
    "The film was longer than we expected, but we enjoyed it.",
    "A cold glass of water is welcome on a hot day.",
    "How do you usually spend your weekends?",
    "What time does the shop open in the morning?",
    "Could you pass me the salt, please?",
    "Why do leaves change colour in the autumn?",
    "Where did you put the keys to the car?",
    "The old clock in the hallway ticks loudly at night.",
    "Many people enjoy listening to music while they cook.",
    "The box was heavier than it looked.",
    "After lunch, the office became very quiet.",
    "The river was calm and reflected the clouds above it.",
    "Turn left at the next corner and keep walking straight.",
    "The students took notes while the teacher spoke.",
    "A small boat drifted slowly towards the shore.",
    "The soup needs a little more salt and pepper.",
    "He tied his shoes and went out for a run.",
    "The museum has a new exhibition about ancient pottery.",
    "Snow covered the fields and the fences overnight.",
    "It is polite to say thank you when someone helps you.",
    "The printer ran out of paper in the middle of the job.",
    "Birds gathered on the wire above the street.",
)


def check_subject(prompt: str, subject: str) -> None:
    """Raise ValueError unless ``prompt`` names ``subject``, matched case-insensitively
    (datasets lower-case subjects); a blank subject is refused too."""
    if not subject.strip():
        raise ValueError("subject must be a non-empty string")
    if not re.search(re.escape(subject), prompt, re.IGNORECASE):
        raise ValueError(f"subject {subject!r} does not occur in the prompt {prompt!r}")
