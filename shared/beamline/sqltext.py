"""SQL text scanning that understands quotes and comments: splitting a schema file into
statements, and telling the read-only guard how many statements a query holds.

A `;`, `--` or `/*` inside a string literal or a quoted identifier is text, not syntax.
"""

from __future__ import annotations


def scan(sql: str) -> tuple[list[str], bool]:
    """Split SQL on `;` outside quotes and comments; also say whether the text ends inside
    an unclosed quote or comment. Returns the statements (comments kept, empties dropped)."""
    statements: list[str] = []
    start = 0
    i, n = 0, len(sql)
    unclosed = False
    while i < n:
        c = sql[i]
        if c in ("'", '"', "`"):
            j = i + 1
            while j < n:
                if sql[j] == "\\":
                    j += 2
                    continue
                if sql[j] == c:
                    if j + 1 < n and sql[j + 1] == c:  # doubled quote
                        j += 2
                        continue
                    break
                j += 1
            if j >= n:
                unclosed = True
            i = j + 1
        elif (c == "-" and sql.startswith("--", i)) or (
            c == "#" and sql.startswith(("# ", "#!"), i)
        ):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
        elif c == "/" and sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            if j < 0:
                unclosed = True
                i = n
            else:
                i = j + 2
        elif c == ";":
            statements.append(sql[start:i])
            start = i + 1
            i += 1
        else:
            i += 1
    statements.append(sql[start:])
    return [s for s in statements if strip_comments(s).strip()], unclosed


def strip_comments(sql: str) -> str:
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        if sql.startswith("--", i) or sql.startswith(("# ", "#!"), i):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
            out.append(" ")
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            i = n if j < 0 else j + 2
            out.append(" ")
        else:
            out.append(sql[i])
            i += 1
    return "".join(out)


def split_statements(sql: str) -> list[str]:
    """The statements of a schema file, split on `;` outside quotes and comments."""
    statements, _ = scan(sql)
    return [s.strip() for s in statements]
