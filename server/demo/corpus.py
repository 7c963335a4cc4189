"""The demo model's training text: documentation that ships with every CPython.

Two sources, both read without importing anything beyond `pydoc_data`: the language reference
topics behind `help("for")` (split into sections), and the docstrings of standard-library
modules (read from source). A few chat turns derived from them teach the chat format.
"""

from __future__ import annotations

import ast
import functools
import inspect
import io
import logging
import re
import sysconfig
import tokenize
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# Packages whose docstrings are tests, generated boilerplate or tool internals, not prose.
SKIPPED_PACKAGES = frozenset(
    {"test", "tests", "idlelib", "lib2to3", "turtledemo", "encodings", "ensurepip", "pydoc_data"}
)
MIN_DOCSTRING_CHARS = 150
MIN_TOPIC_CHARS = 1000
MIN_ANSWER_CHARS = 60
VALIDATION_EVERY = 20  # every 20th document (5%) is held out
UNDERLINE_CHARS = "*=-~^"
KEEP_LINE = re.compile(r"\s|[*+-] |\d+\. |\[|>>>")  # indented, list items, footnotes, doctests
TOPIC_QUESTIONS = (
    "Tell me about {}.",
    "What does the documentation say about {}?",
    "Explain {}.",
)
MODULE_QUESTIONS = (
    "What does the Python module {} do?",
    "What is the {} module for?",
    "Describe the {} module.",
)


@dataclass(frozen=True)
class Document:
    """One training document: where it came from, its title, and its text."""

    source: str  # "topics:<key>" or "module:<dotted name>"
    title: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """Documents split into training and validation, plus chat turns built from training ones."""

    train: tuple[Document, ...]
    validation: tuple[Document, ...]
    chats: tuple[tuple[str, str], ...]  # (question, answer)

    def texts(self) -> list[str]:
        """Every piece of text in the corpus, held-out documents included."""
        docs = [d.text for d in (*self.train, *self.validation)]
        return docs + [text for turn in self.chats for text in turn]

    @property
    def num_chars(self) -> int:
        return sum(len(text) for text in self.texts())


def unwrap(text: str) -> str:
    """Hard-wrapped prose paragraphs joined into single lines; code, lists and notes kept.

    Wrapped at ~70 columns, a third of the lines end mid-sentence: the model would spend its
    small capacity learning where the newlines go instead of how sentences continue.
    """
    paragraphs = text.split("\n\n")
    return "\n\n".join(
        p
        if any(KEEP_LINE.match(line) for line in p.split("\n")[1:]) or p[:1].isspace()
        else " ".join(line.strip() for line in p.split("\n"))
        for p in paragraphs
    )


def _split_sections(key: str, text: str) -> Iterator[Document]:
    """A topic's sections, each a title line and its body (reST underlines dropped)."""
    lines = text.strip("\n").split("\n")
    starts = [
        i
        for i in range(len(lines) - 1)
        if lines[i].strip()
        and len(lines[i + 1]) == len(lines[i])
        and len(set(lines[i + 1])) == 1
        and lines[i + 1][0] in UNDERLINE_CHARS
    ]
    if not starts or starts[0] != 0:
        starts = [-1, *starts]  # text before the first heading has no title of its own
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        title = lines[start].strip() if start >= 0 else key
        body = "\n".join(lines[start + 2 : end] if start >= 0 else lines[:end]).strip("\n")
        body = unwrap(body)
        text = body if start < 0 else f"{title}\n\n{body}" if body else title
        yield Document(f"topics:{key}", title, text)


def _merge_short(sections: Iterable[Document]) -> Iterator[Document]:
    """Consecutive sections joined until each document has MIN_TOPIC_CHARS.

    Many short documents would teach the model to end text after a sentence or two.
    """
    pending: Document | None = None
    for section in sections:
        if pending is None:
            pending = section
        else:
            text = f"{pending.text}\n\n{section.text}"
            pending = Document(pending.source, pending.title, text)
        if len(pending.text) >= MIN_TOPIC_CHARS:
            yield pending
            pending = None
    if pending is not None:
        yield pending


def topic_documents() -> list[Document]:
    """The language reference topics (`pydoc_data.topics`), in sections of some length."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package pydoc_data separately
        logger.warning("pydoc_data is not installed; the demo corpus has no reference topics")
        return []
    # Topics overlap ("compound" holds "for", "while", ...): keep each section once.
    seen: set[str] = set()
    docs = []
    for key in sorted(topics):
        sections = [s for s in _split_sections(key, topics[key]) if s.text not in seen]
        seen.update(s.text for s in sections)
        docs.extend(_merge_short(sections))
    return docs


def _leading_docstring(path: Path) -> str | None:
    """The module docstring of a source file, read from its first tokens (no full parse)."""
    try:
        source = path.read_text(encoding="utf-8")
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE):
                continue
            if tok.type != tokenize.STRING:
                return None
            value = ast.literal_eval(tok.string)
            return inspect.cleandoc(value) if isinstance(value, str) else None
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError, tokenize.TokenError):
        return None
    return None


def _module_name(rel: Path) -> str | None:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if not parts or SKIPPED_PACKAGES.intersection(parts):
        return None
    if any(not p.isidentifier() or p.startswith("_") for p in parts):
        return None
    return ".".join(parts)


def module_documents() -> list[Document]:
    """Docstrings of the public pure-Python standard-library modules, by module name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if "site-packages" in rel.parts or "dist-packages" in rel.parts:
            continue
        name = _module_name(rel)
        if name is None:
            continue
        text = _leading_docstring(path)
        if text and len(text) >= MIN_DOCSTRING_CHARS:
            docs.append(Document(f"module:{name}", name, unwrap(text)))
    return docs


def _first_paragraph(text: str) -> str | None:
    """The first prose paragraph after the title line that makes a whole answer."""
    for para in text.split("\n\n")[1:]:
        if para.startswith((" ", "\t", "(")) or "::=" in para:
            continue  # code, grammar, notes and asides make poor answers
        if len(para) >= MIN_ANSWER_CHARS and not para.endswith(":"):
            return para
    return None


def _chat_turn(n: int, doc: Document) -> tuple[str, str] | None:
    if doc.source.startswith("module:"):
        answer = doc.text.split("\n\n")[0]
        question = MODULE_QUESTIONS[n % len(MODULE_QUESTIONS)].format(doc.title)
        ok = len(answer) >= MIN_ANSWER_CHARS and not answer.endswith(":")
        return (question, answer) if ok else None
    answer = _first_paragraph(doc.text)
    if answer is None:
        return None
    subject = doc.title[0].lower() + doc.title[1:] if doc.title[:2].istitle() else doc.title
    return TOPIC_QUESTIONS[n % len(TOPIC_QUESTIONS)].format(subject), answer


@functools.cache
def load_corpus() -> Corpus:
    """All demo documents in a fixed order, with every VALIDATION_EVERY-th held out."""
    docs = topic_documents() + module_documents()
    if not docs:
        raise RuntimeError("found no documentation text in this Python installation")
    held_out = [i % VALIDATION_EVERY == VALIDATION_EVERY // 2 for i in range(len(docs))]
    train = tuple(d for d, out in zip(docs, held_out, strict=True) if not out)
    validation = tuple(d for d, out in zip(docs, held_out, strict=True) if out)
    chats = tuple(turn for n, d in enumerate(train) if (turn := _chat_turn(n, d)) is not None)
    corpus = Corpus(train, validation, chats)
    logger.info(
        "demo corpus: %d training and %d validation documents, %d chat turns, %.2f MB",
        len(train),
        len(validation),
        len(chats),
        corpus.num_chars / 1e6,
    )
    return corpus
