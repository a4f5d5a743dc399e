"""BM25 retrieval over a local corpus (a list of documents or a jsonl file) and a `search` tool."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from envs.tools import Tool

_WORD = re.compile(r"[a-z0-9]+")
STOPWORDS = frozenset(
    "a an and are as at be but by for from has have how i in is it its of on or that the this to was were "
    "what when where which who why will with".split())


def tokenize(text: str) -> list[str]:
    """Lower-cased alphanumeric words without stop words."""
    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


@dataclass(frozen=True)
class SearchHit:
    """One ranked document."""

    doc_id: str
    score: float
    text: str


class BM25Index:
    """Okapi BM25 (idf = ln(1 + (N - df + 0.5) / (df + 0.5))) over an in-memory corpus."""

    def __init__(self, documents: Sequence[str], ids: Sequence[str] | None = None, *, k1: float = 1.5,
                 b: float = 0.75):
        if not documents:
            raise ValueError("BM25Index needs at least one document")
        if ids is not None and len(ids) != len(documents):
            raise ValueError(f"got {len(ids)} ids for {len(documents)} documents")
        if k1 < 0 or not 0 <= b <= 1:
            raise ValueError(f"need k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        self.documents = list(documents)
        self.ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(documents))]
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("document ids must be unique")
        self.k1, self.b = k1, b
        self.term_counts = [Counter(tokenize(d)) for d in self.documents]
        self.lengths = [sum(c.values()) for c in self.term_counts]
        self.avg_length = sum(self.lengths) / len(self.lengths) or 1.0
        df: Counter[str] = Counter()
        for counts in self.term_counts:
            df.update(counts.keys())
        n = len(self.documents)
        self.idf = {t: math.log(1.0 + (n - d + 0.5) / (d + 0.5)) for t, d in df.items()}
        self.postings: dict[str, list[int]] = {}
        for i, counts in enumerate(self.term_counts):
            for t in counts:
                self.postings.setdefault(t, []).append(i)

    @classmethod
    def from_jsonl(cls, path: str | Path, *, text_field: str = "text", id_field: str | None = "id",
                   title_field: str | None = "title", **kwargs) -> "BM25Index":
        """Index a jsonl file, one document object per line (title, if present, is prepended to the text)."""
        docs, ids = [], []
        for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise ValueError(f"{path}:{lineno}: expected an object with a string {text_field!r} field")
            title = row.get(title_field) if title_field else None
            docs.append(f"{title}\n{row[text_field]}" if isinstance(title, str) and title else row[text_field])
            ids.append(str(row[id_field]) if id_field and id_field in row else str(len(ids)))
        return cls(docs, ids, **kwargs)

    def score(self, query: str, doc: int) -> float:
        """BM25 score of one document for a query."""
        counts, norm = self.term_counts[doc], self.k1 * (1 - self.b + self.b * self.lengths[doc] / self.avg_length)
        total = 0.0
        for term in tokenize(query):
            tf = counts.get(term, 0)
            if tf:
                total += self.idf[term] * tf * (self.k1 + 1) / (tf + norm)
        return total

    def search(self, query: str, k: int = 5) -> list[SearchHit]:
        """The `k` best documents with a positive score, best first (ties by corpus order)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        candidates = {i for t in set(tokenize(query)) for i in self.postings.get(t, ())}
        scored = sorted(((self.score(query, i), i) for i in candidates), key=lambda s: (-s[0], s[1]))
        return [SearchHit(self.ids[i], s, self.documents[i]) for s, i in scored[:k] if s > 0]


def retrieval_tool(index: BM25Index, k: int = 3, max_chars_per_doc: int = 1000) -> Tool:
    """A `search` tool returning the top documents for a query."""
    if k < 1 or max_chars_per_doc < 1:
        raise ValueError(f"need k >= 1 and max_chars_per_doc >= 1, got {k}, {max_chars_per_doc}")

    def search(query: str) -> str:
        hits = index.search(query, k)
        if not hits:
            return "no documents found"
        return "\n\n".join(f"[{h.doc_id}] {h.text[:max_chars_per_doc]}" for h in hits)

    return Tool("search", "Search the document collection; returns the most relevant passages.",
                {"type": "object", "properties": {"query": {"type": "string", "description": "search words"}},
                 "required": ["query"]},
                search)
