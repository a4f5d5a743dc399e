"""Help text of config dataclass fields, read from their source: the string literal under a field, else its
trailing `# comment` (train.py's flags and `python -m inference_engine.serve --help` both come from here)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize


def field_docs(cls: type, wrapped_comments: bool = False) -> dict[str, str]:
    """{field: help} of a dataclass (and its dataclass bases): the string literal under a field, else its trailing
    # comment; with `wrapped_comments`, comment-only lines right below a trailing comment continue it (for classes
    without section-heading comments, whose long comments wrap onto the next lines)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
            tree = ast.parse(source)
        except (OSError, TypeError, SyntaxError):
            continue
        comments = {tok.start[0]: tok.string.lstrip("#").strip()
                    for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
        lines = source.splitlines()
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, nxt in zip(body, body[1:] + [None]):
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            if (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
            elif stmt.end_lineno in comments:
                parts, line = [comments[stmt.end_lineno]], stmt.end_lineno + 1
                while wrapped_comments and line in comments and lines[line - 1].lstrip().startswith("#"):
                    parts.append(comments[line])
                    line += 1
                docs[stmt.target.id] = " ".join(parts)
    return docs
