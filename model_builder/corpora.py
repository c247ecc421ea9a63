"""Text generated in code: what the byte-level BPE and Unigram tokenizers are trained on, and the
labelled sentences the default sentiment model's head learns from.

Seeded, so every build trains the same tokenizers and head; no data set is downloaded.
"""

from __future__ import annotations

import random
from functools import lru_cache

CORPUS_SEED = 0
# The T5 convention for telling the model the task: a text prefix. The translation corpus pairs
# it with English sentences, and the t5-translator's config names it (models.py).
TRANSLATION_PREFIX = "translate English to French: "

_SUBJECTS = (
    "the server", "a client", "the model", "our team", "the scheduler", "every request", "the cat",
    "a small dog", "the old man", "my sister", "the teacher", "a young girl", "the engineer",
    "the city", "this river", "the market", "a farmer", "the children", "the government",
    "the weather", "the company", "a bird", "the train", "the doctor", "her friend", "the queue",
    "the batch", "the tokenizer", "the garden", "the library", "a musician", "the students",
)
_VERBS = (
    "reads", "writes", "answers", "sends", "receives", "builds", "finds", "loves", "watches",
    "carries", "opens", "closes", "follows", "measures", "explains", "remembers", "visits",
    "paints", "cooks", "repairs", "counts", "sorts", "returns", "streams", "serves", "schedules",
    "translates", "summarizes", "classifies", "predicts", "generates", "encodes", "decodes",
)
_OBJECTS = (
    "a long letter", "the results", "every message", "the old book", "a new house", "the answer",
    "the first batch", "a red apple", "the blue car", "the small boat", "a warm meal", "the map",
    "the last token", "a quiet song", "the morning news", "a short story", "the market prices",
    "the broken window", "the heavy box", "a good question", "the tensors", "the weights",
    "the whole sentence", "a summary", "the translation", "the garden gate", "the mountain road",
)
_ENDINGS = (
    "in the morning", "before noon", "after lunch", "every day", "at night", "on Monday",
    "with great care", "without a word", "as fast as possible", "in the rain", "near the station",
    "for the second time", "under the bridge", "at the end of the week", "in less than a second",
    "while the others wait", "because it was late", "when the sun rose", "during the winter",
)
_PROSE = (
    "Machine learning models turn text into numbers and numbers back into text.",
    "A good server keeps its promises: every request gets an answer or a clear error.",
    "Batching merges many small requests into one large forward pass, which is faster per item.",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "It was a bright cold day in April, and the clocks were striking thirteen.",
    "Summaries should be short, faithful to the source, and easy to read.",
    "Questions have answers; sometimes the answer is in the context, sometimes it is not.",
    "Numbers such as 3, 14, 159, 2024 and 1.5e-3 appear in logs, prices and measurements.",
    "She said: \"Don't forget the keys!\" He replied, 'I won't.' Then they left (quietly).",
    "Is it raining? No; it's sunny - and warm, too. Really!",
    "Tokens stream back to the client one by one while the model keeps decoding.",
    "Translation maps a sentence in one language to a sentence with the same meaning in another.",
)
# Non-ASCII text, so that the byte-level tokenizers learn multi-byte characters and generated
# text can contain them.
_NON_ASCII = (
    "café naïve résumé façade jalapeño über Straße Ångström señor crème brûlée déjà vu",
    "日本語 のテキスト です。 東京 と 京都。 中文 文本 和 汉字。 한국어 문장 입니다.",
    "Ελληνικά κείμενα, русский текст, עברית, العربية, हिन्दी",
    "emoji 🙂 😀 🚀 🎉 👍 ❤️ ☕ 🌍 and symbols € £ ¥ © ® ™ — – … « » “quoted” ‘single’ °C ±5 µs",
)
# Short English/French pairs: the translation tokenizer must cover both languages.
_PARALLEL = (
    ("the cat is on the table", "le chat est sur la table"),
    ("the house is small", "la maison est petite"),
    ("I am reading a book", "je lis un livre"),
    ("the weather is nice today", "il fait beau aujourd'hui"),
    ("where is the train station", "où est la gare"),
    ("we eat bread and cheese", "nous mangeons du pain et du fromage"),
    ("the children play in the garden", "les enfants jouent dans le jardin"),
    ("thank you very much", "merci beaucoup"),
    ("good morning, my friend", "bonjour, mon ami"),
    ("the summer was very hot", "l'été était très chaud"),
    ("she opens the window", "elle ouvre la fenêtre"),
    ("the server answers every request", "le serveur répond à chaque requête"),
    ("he is a teacher", "il est professeur"),
    ("the coffee is hot", "le café est chaud"),
    ("I don't understand the question", "je ne comprends pas la question"),
)


@lru_cache(maxsize=None)
def english_corpus() -> tuple[str, ...]:
    """About 40 KB of deterministic English text with some non-ASCII lines mixed in."""
    rng = random.Random(CORPUS_SEED)
    lines: list[str] = []
    for i in range(600):
        parts = (rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_ENDINGS))
        sentence = " ".join(parts)
        sentence = sentence[0].upper() + sentence[1:] + rng.choice((".", ".", ".", "!", "?"))
        lines.append(sentence)
        if i % 10 == 0:
            lines.append(rng.choice(_PROSE))
        if i % 25 == 0:
            lines.append(rng.choice(_NON_ASCII))
    lines.extend(_PROSE)
    lines.extend(_NON_ASCII)
    return tuple(lines)


@lru_cache(maxsize=None)
def translation_corpus() -> tuple[str, ...]:
    """The English corpus plus prefixed English/French pairs."""
    lines = list(english_corpus())
    for english, french in _PARALLEL * 4:
        lines.append(TRANSLATION_PREFIX + english)
        lines.append(french)
    return tuple(lines)


# -- labelled sentiment sentences: what the default `sentiment` model's head is trained on --------
# Every positive template pairs with every topic, and so does every negative one: the labels are
# balanced and the topics say nothing about the label, so the head can only learn the wording.
_SENTIMENT_TOPICS = (
    "this movie", "the new phone", "this library", "the food", "the service", "my job", "the weather today",
    "this book", "the concert", "the update", "the coffee", "the hotel", "this game", "this song",
    "the train ride", "the documentation", "the support team", "the code", "the design", "the city",
    "the restaurant", "this app", "the trip", "the show", "the course", "the neighbours", "this laptop",
    "the weekend", "the meeting", "the results", "working with this team", "using this tool",
)
_POSITIVE_TEMPLATES = (
    "I love {}.", "I really like {}!", "{} is great.", "{} is wonderful.", "{} is amazing!", "{} was excellent.",
    "I enjoyed {} so much.", "What a fantastic experience {} was!", "{} made me so happy.", "I'm delighted with {}.",
    "{} is the best.", "Highly recommend {}.", "{} is beautiful and fun.", "I adore {}.", "Thanks, {} is perfect!",
    "{} works perfectly.", "I am pleased with {}.", "{} exceeded my expectations.", "{} is brilliant.",
    "Such a lovely time with {}.",
)
_NEGATIVE_TEMPLATES = (
    "I hate {}.", "I really dislike {}!", "{} is terrible.", "{} is awful.", "{} is horrible!", "{} was a disaster.",
    "I regret {}.", "What a miserable experience {} was!", "{} made me so angry.", "I'm disappointed with {}.",
    "{} is the worst.", "Avoid {} at all costs.", "{} is ugly and boring.", "I can't stand {}.",
    "Ugh, {} is broken again!", "{} never works.", "I am annoyed by {}.", "{} fell far short of my expectations.",
    "{} is pathetic.", "Such a painful time with {}.",
)
NEGATIVE, POSITIVE = 0, 1


@lru_cache(maxsize=None)
def sentiment_corpus() -> tuple[tuple[str, int], ...]:
    """1280 (sentence, label) pairs, label 0 negative and 1 positive, in a fixed order."""
    def sentence(template: str, topic: str) -> str:
        text = template.format(topic)
        return text[0].upper() + text[1:]

    return tuple(
        (sentence(template, topic), label)
        for label, templates in ((POSITIVE, _POSITIVE_TEMPLATES), (NEGATIVE, _NEGATIVE_TEMPLATES))
        for template in templates
        for topic in _SENTIMENT_TOPICS
    )
